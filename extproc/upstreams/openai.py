"""Kind ``openai``: any OpenAI-compatible server, the request passed through with ``model`` renamed.

The answer goes to the client as the upstream sent it; the gateway only reads its usage (the
JSON's ``usage``, or the stream's usage event) and notes when the stream's ``[DONE]`` went out.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from extproc.formats import openai as oai
from extproc.formats import tokens
from extproc.formats.sse import SSEParser
from extproc.upstreams import auth
from extproc.upstreams.base import Translated, UpstreamRequest, WholeBody, error_response

if TYPE_CHECKING:
    from extproc.framework.config import TierConfig
    from extproc.framework.context import RequestContext


class OpenAIUpstream:
    """Calls an OpenAI-compatible upstream."""

    kind = "openai"
    takes_api_key = True
    exports_triton_metrics = False

    def default_max_tokens(self, tier: "TierConfig") -> int | None:
        return None  # the upstream applies its own default

    def auth_headers(self, name: str, tier: "TierConfig"):
        return auth.auth_headers(name, tier)

    def prompt_tokens(self, tier: "TierConfig", request: "oai.OpenAIRequest") -> int:
        # the messages go as they are: OpenAI's own way of counting them (the cookbook's overheads)
        if request.messages is not None:
            return tokens.count_chat(request.messages, tier.tokenizer)
        return tokens.count_text(request.prompt or "", tier.tokenizer)

    def request(self, ctx: "RequestContext") -> "OpenAICall":
        return OpenAICall(ctx)


class OpenAICall:
    """One request passed through to an OpenAI-compatible upstream."""

    def __init__(self, ctx: "RequestContext"):
        req = ctx.request
        req.model = ctx.tier_config.model
        self.upstream = UpstreamRequest(ctx.path, oai.request_to_body(req))

    def response(self, status: int, stream: bool):
        if status != 200:
            return error_response(status)
        if stream:
            return [], [], _StreamUsage()
        return [], [], WholeBody(_whole, hold_back=False)


def _whole(body: bytes) -> Translated:
    usage = None
    try:
        usage = oai.usage_from_openai(json.loads(body))
    except ValueError:
        pass
    return Translated(sent=body, complete=True, usage=usage)


class _StreamUsage:
    """Reads the usage event and ``[DONE]`` out of the upstream's SSE, passing every byte on."""

    def __init__(self):
        self._sse = SSEParser()
        self._done = False
        self.usage: oai.Usage | None = None

    def _event(self, data: str) -> None:
        if not data.startswith("{"):
            if data.strip() == "[DONE]":
                self._done = True
            return
        try:
            usage = oai.usage_from_openai(json.loads(data))
        except ValueError:
            return
        if usage is not None:
            self.usage = usage

    def translate(self, chunk: bytes, end_of_stream: bool) -> Translated:
        for event in self._sse.feed(chunk):
            self._event(event.data)
        if end_of_stream:
            for event in self._sse.flush():
                self._event(event.data)
        return Translated(sent=chunk, usage=self.usage, complete=end_of_stream or self._done)
