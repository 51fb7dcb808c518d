"""Kind ``triton``: NVIDIA Triton's generate API (``/v2/models/<model>/generate[_stream]``).

The chat is rendered with the tier's chat template into one prompt and always sent to
``generate_stream`` with ``stream: true``, whatever the client asked: Triton then answers with one
SSE event per token, which the gateway passes on as OpenAI's SSE or, for a client that did not ask
for a stream, gathers into one chat/completions JSON. A model that stops producing tokens is thus
seen by Envoy as an idle upstream (the Triton routes' ``per_try_idle_timeout``, envoy/envoy.yaml)
and answered with a 504 instead of holding the client: Triton's Python backend never fails a
request whose model process died mid-request (triton-inference-server/server#7862), and a unary
``generate`` sends no byte before the last token, so a dead model and a long answer looked alike.
Usage is counted by the tier's tokenizer where the model does not report it.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING

from extproc.formats import openai as oai
from extproc.formats import tokens
from extproc.formats import triton as triton_format
from extproc.formats.chat_templates import render
from extproc.upstreams import auth
from extproc.upstreams.base import Translated, UpstreamRequest, WholeBody, error_response

if TYPE_CHECKING:
    from extproc.framework.config import TierConfig
    from extproc.framework.context import RequestContext


class TritonUpstream:
    """Calls a Triton model through its generate API."""

    kind = "triton"
    takes_api_key = False
    exports_triton_metrics = True

    def default_max_tokens(self, tier: "TierConfig") -> int | None:
        return tier.default_max_tokens

    def prompt_tokens(self, tier: "TierConfig", request: "oai.OpenAIRequest") -> int:
        # exactly what the model is given (the chat template applied), counted by the tier's tokenizer
        return tokens.count_text(prompt_text(tier, request), tier.tokenizer)

    def auth_headers(self, name: str, tier: "TierConfig"):
        return auth.auth_headers(name, tier)

    def request(self, ctx: "RequestContext") -> "TritonCall":
        return TritonCall(ctx)


#: Triton's statuses that mean "this model cannot serve now", answered 503 (retryable), never 400:
#: a model process that died ("Stub process ... is not healthy"), a model being reloaded or not
#: loaded ("Request for unknown model"). The gateway validated the request before sending it, so
#: a rejection by Triton is not the client's mistake.
MODEL_UNAVAILABLE = (400, 404)


def prompt_text(tier: "TierConfig", request: "oai.OpenAIRequest") -> str:
    """The text the model is given: the chat rendered with the tier's template, or the prompt."""
    return render(tier.chat_template, request.messages) if request.messages is not None else (request.prompt or "")


def check_context_window(ctx: "RequestContext", prompt: str, max_tokens: int) -> None:
    """400 ``context_length_exceeded`` when prompt + completion budget exceed the tier's window,
    pinned requests included (``auto`` ones were kept to tiers that fit by ``route_rules``).

    Counting costs a tokenizer pass, so it is done only when it could matter: a token is at least
    one byte, so a prompt of fewer bytes than the window's room fits without being counted."""
    tier = ctx.tier_config
    room = tier.context_window - max_tokens
    if len(prompt) <= room and len(prompt.encode("utf-8", "surrogatepass")) <= room:
        return
    count = tokens.count_text(prompt, tier.tokenizer)
    if count <= room:
        return
    req = ctx.request
    raise oai.OpenAIError(
        400, f"This model's maximum context length is {tier.context_window} tokens. However, you requested "
        f"{count + max_tokens} tokens ({count} in the {'messages' if req.messages is not None else 'prompt'}, "
        f"{max_tokens} in the completion). Please reduce the length of the messages or completion.",
        param="messages" if req.messages is not None else "prompt", code="context_length_exceeded")


class TritonCall:
    """One request to Triton and the translation of its answer."""

    def __init__(self, ctx: "RequestContext"):
        req, tier = ctx.request, ctx.tier_config
        self.ctx = ctx
        self.completion_id = oai.new_completion_id(ctx.endpoint)
        self.created = int(time.time())
        triton_format.check_supported(req)
        self.prompt = prompt_text(tier, req)
        self.max_tokens = req.max_tokens or tier.default_max_tokens
        check_context_window(ctx, self.prompt, self.max_tokens)
        self.upstream = UpstreamRequest(
            triton_format.generate_path(tier.model, stream=True),
            triton_format.generate_body(req, self.prompt, default_max_tokens=tier.default_max_tokens, stream=True),
        )

    def _translation(self) -> dict:
        """The request's facts the translators need, and how they count tokens the model did not report."""
        ctx = self.ctx
        encoding = ctx.tier_config.tokenizer
        return {"req": ctx.request, "completion_id": self.completion_id, "created": self.created,
                "model": ctx.tier_config.model, "count_tokens": functools.partial(tokens.count_text, encoding=encoding),
                "prompt": self.prompt, "max_tokens": self.max_tokens}

    def response(self, status: int, stream: bool):
        if status in MODEL_UNAVAILABLE:  # the request was validated here: the model could not take it
            headers, remove, translator = error_response(503)
            return [(":status", "503"), ("retry-after", "1"), *headers], remove, translator
        if status != 200:
            return error_response(status)
        if stream:
            translator = _StreamTranslation(triton_format.StreamTranslator(**self._translation()))
            return [("content-type", "text/event-stream"), ("cache-control", "no-cache")], ["content-length"], translator
        return [("content-type", "application/json")], ["content-length"], WholeBody(self._whole, hold_back=True)

    def _whole(self, body: bytes) -> Translated:
        """Every event of the stream, gathered into the one JSON a non-streaming client asked for."""
        try:
            out, usage = triton_format.gather_stream(body, **self._translation())
        except oai.OpenAIError as err:  # an error event, or a stream with no event: the error's status
            out = err.to_json()
            return Translated(body=out, complete=True, error=out, status=err.status)
        return Translated(body=out, sent=out, complete=True, usage=usage)


class _StreamTranslation:
    """Triton's generate_stream events -> OpenAI chunks; complete once ``[DONE]`` is out."""

    def __init__(self, translator: triton_format.StreamTranslator):
        self.translator = translator

    def translate(self, chunk: bytes, end_of_stream: bool) -> Translated:
        t = self.translator
        out = t.feed(chunk)
        text = t.last_text
        if end_of_stream:
            out += t.finish()
            text += t.last_text
        # Complete once [DONE] is out, not only at the upstream's end of stream: a client may
        # close as soon as it reads [DONE], before that last (empty) chunk reaches us.
        if end_of_stream or t.done:
            return Translated(body=out, sent=out, text=text, complete=True, usage=t.usage, error=t.error)
        return Translated(body=out, sent=out, text=text)
