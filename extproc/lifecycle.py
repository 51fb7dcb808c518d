"""The life of one request through the gateway, top to bottom.

Envoy hands the ext_proc service one phase at a time; :class:`RequestLifecycle` turns each into
hook calls and a decision:

1. **request headers**: route the path to an endpoint (``/v1/chat/completions``,
   ``/v1/completions``; ``GET /v1/models`` is answered here, once ``extproc_request_headers`` let it
   through), refuse a body over the size limit,
   strip the gateway's internal ``x-extproc-*`` headers a client may have sent, and call
   ``extproc_request_headers``.
2. **request body**: parse the OpenAI request (bad input gets an OpenAI-style 4xx), call
   ``extproc_request_parsed``, then ``extproc_choose_tier`` and ``extproc_adjust_tier``; build the
   upstream request for the tier's kind (Triton generate: chat template, path and body rewritten;
   OpenAI-compatible: the request passed through with the model renamed), call
   ``extproc_before_upstream``, and send it on with the ``x-extproc-tier`` header set and Envoy's
   route cache cleared so the route is re-picked.
3. **response headers**: note the status, drop ``content-length`` where the body will change, set
   the content type and the gateway's response headers.
4. **response body**: translate Triton's answer into OpenAI's, chunk by chunk for SSE (events split
   across chunks are reassembled), calling ``extproc_response_chunk``; at the end take the usage,
   price it, and call ``extproc_response_complete``.
5. **stream closed**: whatever happened, call ``extproc_request_finished`` once.

At any step a hook may answer instead (a :class:`~extproc.decisions.Reply`, or an
:class:`~extproc.openai_format.OpenAIError` raised), which Envoy sends as an ImmediateResponse.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from typing import TYPE_CHECKING

from . import openai_format as oai
from . import tokens, triton_format
from .chat_templates import render
from .context import RequestContext, ResponseChunk, TierChoice, UpstreamRequest
from .decisions import Continue, Decision, Reply
from .plugins import PluginFailure
from .sse import SSEParser

if TYPE_CHECKING:
    from .gateway import Gateway

INTERNAL_PREFIX = "x-extproc-"
TIER_HEADER = "x-extproc-tier"
STREAM_HEADER = "x-extproc-stream"  # Envoy's stream routes: no overall timeout, safe retries only
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
MODELS_PATH = "/v1/models"


def _answers_errors(phase):
    """Turn an OpenAIError or a fail-closed plugin failure raised in a phase into a reply."""

    @functools.wraps(phase)
    async def wrapper(self: "RequestLifecycle", *args) -> Decision:
        try:
            return await phase(self, *args)
        except oai.OpenAIError as err:
            return self._reply_error(err)
        except PluginFailure as failure:
            err = oai.internal_error(
                f"The gateway policy {failure.plugin!r} failed, and it is configured to fail closed.",
                code="plugin_error",
            )
            return self._reply_error(err)

    return wrapper


def _timed(phase):
    """Add the phase's wall time (its hooks included) to ``ctx.timings_ms['phase:<name>']``."""
    key = f"phase:{phase.__name__}"

    @functools.wraps(phase)
    async def wrapper(self: "RequestLifecycle", *args) -> Decision:
        start = time.perf_counter()
        try:
            return await phase(self, *args)
        finally:
            ctx = self.ctx
            if ctx is not None:
                timings = ctx.timings_ms
                timings[key] = timings.get(key, 0.0) + (time.perf_counter() - start) * 1000.0

    return wrapper


class RequestLifecycle:
    """One request's way through the gateway; the wire layer calls one method per phase."""

    def __init__(self, gateway: "Gateway"):
        self.gateway = gateway
        self.hooks = gateway.hooks
        self.ctx: RequestContext | None = None
        self.upstream_kind: str | None = None  # "triton" | "openai" once a tier is chosen
        self.completion_id = ""
        self.created = 0
        self._mode = "pass"  # how the response body is handled; set from the response headers
        self._buffer = bytearray()
        self._translator: triton_format.StreamTranslator | None = None
        self._sse: SSEParser | None = None
        self._upstream_done = False  # an OpenAI upstream's stream sent [DONE]
        self._chunks = 0
        self._prompt: str | None = None  # the rendered prompt sent to Triton
        self._max_tokens: int | None = None  # the completion limit sent to Triton

    # 1. request headers ----------------------------------------------------------------------
    @_timed
    @_answers_errors
    async def request_headers(self, headers: dict[str, str], end_of_stream: bool) -> Decision:
        path = headers.get(":path", "/").split("?", 1)[0].rstrip("/") or "/"
        method = headers.get(":method", "GET")
        ctx = self.ctx = RequestContext(
            request_id=headers.get("x-request-id") or uuid.uuid4().hex,
            method=method, path=path, headers=headers,
        )
        ctx.endpoint = ENDPOINTS.get(path)
        if ctx.endpoint is None:
            if path == MODELS_PATH and method == "GET":
                # Identity first: where tenancy requires an API key, listing the models needs one too.
                reply = await self.hooks.first("extproc_request_headers", ctx)
                return self._reply(reply if reply is not None else Reply.json(200, self.gateway.models_list))
            raise oai.not_found_path(path)
        if method != "POST":
            raise oai.method_not_allowed(method)
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.gateway.max_request_bytes:
            raise oai.request_too_large(int(length), self.gateway.max_request_bytes)
        reply = await self.hooks.first("extproc_request_headers", ctx)
        if reply is not None:
            return self._reply(reply)
        if end_of_stream:
            raise oai.invalid_request("The request has no body; send the OpenAI request as JSON.")
        return Continue(remove_headers=[h for h in headers if h.startswith(INTERNAL_PREFIX)])

    # 2. request body ------------------------------------------------------------------------
    @_timed
    @_answers_errors
    async def request_body(self, body: bytes, end_of_stream: bool) -> Decision:
        ctx = self.ctx
        if len(body) > self.gateway.max_request_bytes:
            raise oai.request_too_large(len(body), self.gateway.max_request_bytes)
        ctx.request = oai.parse_request(ctx.endpoint, body)
        reply = await self.hooks.first("extproc_request_parsed", ctx)
        if reply is not None:
            return self._reply(reply)

        candidates = list(self.gateway.tiers.tiers)
        choice = await self.hooks.first("extproc_choose_tier", ctx, candidates=candidates)
        if choice is None:
            raise oai.model_not_found(ctx.request.model)
        if isinstance(choice, str):
            choice = TierChoice(choice)
        await self.hooks.each("extproc_adjust_tier", ctx, choice=choice, candidates=candidates)
        tier = self.gateway.tiers.tiers.get(choice.tier)
        if tier is None:
            raise oai.internal_error(f"A routing policy chose tier {choice.tier!r}, which is not configured.")
        ctx.tier, ctx.tier_config, ctx.tier_reason = choice.tier, tier, choice.reason

        upstream = self._upstream_request(ctx)
        reply = await self.hooks.first("extproc_before_upstream", ctx, upstream=upstream)
        if reply is not None:
            return self._reply(reply)
        headers = [
            (TIER_HEADER, ctx.tier),
            (STREAM_HEADER, "true" if ctx.stream else "false"),
            (":path", upstream.path),
            ("content-type", "application/json"),
            ("content-length", str(len(upstream.body))),
            *upstream.headers.items(),
        ]
        auth_set, auth_remove = self.gateway.tiers.upstream_auth(ctx.tier)
        headers += auth_set
        ctx.upstream_sent_at = time.perf_counter()
        return Continue(set_headers=headers, remove_headers=auth_remove, body=upstream.body, clear_route_cache=True)

    def _upstream_request(self, ctx: RequestContext) -> UpstreamRequest:
        """The request as the chosen tier's upstream wants it."""
        req, tier = ctx.request, ctx.tier_config
        self.upstream_kind = tier.kind
        self.completion_id = oai.new_completion_id(ctx.endpoint)
        self.created = int(time.time())
        if tier.kind == "openai":
            req.model = tier.model
            return UpstreamRequest(ctx.path, oai.request_to_body(req))
        triton_format.check_supported(req)
        prompt = render(tier.chat_template, req.messages) if ctx.endpoint == "chat" else req.prompt
        self._prompt, self._max_tokens = prompt, req.max_tokens or tier.default_max_tokens
        return UpstreamRequest(
            triton_format.generate_path(tier.model, req.stream),
            triton_format.generate_body(req, prompt, default_max_tokens=tier.default_max_tokens),
        )

    async def request_trailers(self, trailers: dict[str, str]) -> Decision:
        return Continue()

    # 3. response headers ---------------------------------------------------------------------
    @_timed
    async def response_headers(self, headers: dict[str, str], end_of_stream: bool) -> Decision:
        ctx = self.ctx
        if ctx is None or ctx.tier is None:  # Envoy's own answer (no route, say): leave it alone
            return Continue()
        status = int(headers.get(":status", "0") or 0)
        ctx.response_status = status
        ctx.first_byte_at = time.perf_counter()
        set_headers = [(TIER_HEADER, ctx.tier), ("x-extproc-request-id", ctx.request_id)]
        if ctx.tier_reason:
            set_headers.append(("x-extproc-tier-reason", ctx.tier_reason))
        remove: list[str] = []
        if status != 200:
            self._mode = "error"
            remove.append("content-length")
            set_headers.append(("content-type", "application/json"))
        elif self.upstream_kind == "triton":
            remove.append("content-length")
            if ctx.stream:
                self._mode = "triton_stream"
                self._translator = triton_format.StreamTranslator(
                    req=ctx.request, completion_id=self.completion_id, created=self.created,
                    model=ctx.tier_config.model, **self._counting())
                set_headers += [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
            else:
                self._mode = "triton_json"
                set_headers.append(("content-type", "application/json"))
        else:
            self._mode = "openai_stream" if ctx.stream else "openai_json"
            if ctx.stream:
                self._sse = SSEParser()
        set_headers += ctx.response_headers.items()
        if ctx.degraded:
            set_headers.append(("x-extproc-degraded", ",".join(ctx.degraded)))
        if end_of_stream:
            await self._finish_response(None)
        return Continue(set_headers=set_headers, remove_headers=remove)

    # 4. response body -----------------------------------------------------------------------
    @_timed
    async def response_body(self, chunk: bytes, end_of_stream: bool) -> Decision:
        mode = self._mode
        if mode == "triton_stream":
            translator = self._translator
            out = translator.feed(chunk)
            text = translator.last_text
            if end_of_stream:
                out += translator.finish()
                text += translator.last_text
            await self._chunk(text, out)
            # Complete once [DONE] is out, not only at the upstream's end of stream: a client may
            # close as soon as it reads [DONE], before that last (empty) chunk reaches us.
            if end_of_stream or translator.done:
                await self._finish_response(translator.usage, error=translator.error)
            return Continue(body=out)
        if mode == "openai_stream":
            for event in self._sse.feed(chunk):
                self._passthrough_event(event.data)
            if chunk:
                await self._chunk("", chunk)
            if end_of_stream:
                for event in self._sse.flush():
                    self._passthrough_event(event.data)
            if end_of_stream or self._upstream_done:  # as above
                await self._finish_response(self.ctx.usage)
            return Continue()
        if mode == "pass":
            return Continue()
        # Whole-body modes: keep the chunks until the end.
        self._buffer += chunk
        if not end_of_stream:
            return Continue(body=b"") if mode != "openai_json" else Continue()
        return await self._whole_body(bytes(self._buffer))

    async def _whole_body(self, body: bytes) -> Decision:
        ctx, mode = self.ctx, self._mode
        if mode == "error":
            out = _as_openai_error(ctx.response_status, body)
            await self._finish_response(None, error=out)
            return Continue(body=out)
        if mode == "openai_json":
            usage = None
            try:
                usage = oai.usage_from_openai(json.loads(body))
            except ValueError:
                pass
            await self._chunk("", body)
            await self._finish_response(usage)
            return Continue()
        try:
            out, usage = triton_format.translate_generate_response(
                body, req=ctx.request, completion_id=self.completion_id, created=self.created,
                model=ctx.tier_config.model, **self._counting())
        except oai.OpenAIError as err:
            out = err.to_json()
            await self._finish_response(None, error=out)
            return Continue(body=out)
        await self._chunk("", out)
        await self._finish_response(usage)
        return Continue(body=out)

    def _counting(self) -> dict:
        """How the translators count tokens when the model does not report them."""
        encoding = self.ctx.tier_config.tokenizer
        return {"count_tokens": functools.partial(tokens.count_text, encoding=encoding),
                "prompt": self._prompt, "max_tokens": self._max_tokens}

    def _passthrough_event(self, data: str) -> None:
        if not data.startswith("{"):
            if data.strip() == "[DONE]":
                self._upstream_done = True
            return
        try:
            usage = oai.usage_from_openai(json.loads(data))
        except ValueError:
            return
        if usage is not None:
            self.ctx.usage = usage

    async def response_trailers(self, trailers: dict[str, str]) -> Decision:
        if self.ctx is not None and self.ctx.outcome == "pending" and self._mode != "pass":
            await self._finish_response(self.ctx.usage)
        return Continue()

    async def _chunk(self, text: str, data: bytes) -> None:
        if not data:
            return
        self._chunks += 1
        if self._chunks == 1:  # time to first token, as the client sees it from its request
            self.ctx.timings_ms["ttft"] = (time.perf_counter() - self.ctx.started) * 1000.0
        await self.hooks.each("extproc_response_chunk", self.ctx, chunk=ResponseChunk(text, data, self._chunks))

    async def _finish_response(self, usage, *, error=None) -> None:
        ctx = self.ctx
        if ctx.outcome != "pending":
            return
        if ctx.upstream_sent_at is not None:
            ctx.timings_ms["upstream"] = (time.perf_counter() - ctx.upstream_sent_at) * 1000.0
        if error is not None:
            ctx.outcome = "failed"
            ctx.error = error.decode("utf-8", "replace")[:500] if isinstance(error, bytes) else str(error)
            return
        ctx.usage = usage
        if usage is not None:  # per-1K token prices or GPU-hour apportioning: extproc/cost_model.py
            ctx.cost_usd = self.gateway.cost_model.upstream_cost(ctx.tier_config, usage)
        ctx.outcome = "completed"
        await self.hooks.each("extproc_response_complete", ctx)

    # 5. the end ----------------------------------------------------------------------------
    async def stream_closed(self, cancelled: bool) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        if ctx.outcome == "pending":
            ctx.outcome = "aborted" if cancelled or ctx.response_status is not None else "failed"
        ctx.finished_at = time.perf_counter()
        await self.hooks.each("extproc_request_finished", ctx)

    def internal_error(self, exc: BaseException) -> Reply:
        return self._reply_error(oai.internal_error("The gateway failed to process the request."))

    # replies -------------------------------------------------------------------------------
    def _reply(self, reply: Reply) -> Reply:
        ctx = self.ctx
        if ctx is not None:
            ctx.outcome = "replied"
            ctx.response_status = reply.status
            extra = [("x-extproc-request-id", ctx.request_id), *ctx.response_headers.items()]
            if ctx.degraded:
                extra.append(("x-extproc-degraded", ",".join(ctx.degraded)))
            reply.headers = [*reply.headers, *extra]
        return reply

    def _reply_error(self, err: oai.OpenAIError) -> Reply:
        if self.ctx is not None:
            self.ctx.error = err.message
        return self._reply(Reply(err.status, err.to_json(), [("content-type", "application/json")],
                                 details=f"extproc_{err.code or err.type}"))


def _as_openai_error(status: int | None, body: bytes) -> bytes:
    """An upstream's error body in OpenAI's format (kept as is when it already is, as Envoy's are)."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        return body
    return triton_format.error_from_triton(status or 502, body).to_json()
