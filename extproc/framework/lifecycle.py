"""The life of one request through the gateway, top to bottom.

Envoy hands the ext_proc service one phase at a time; :class:`RequestLifecycle` turns each into
hook calls and a decision:

1. **request headers**: route the path to an endpoint (``/v1/chat/completions``,
   ``/v1/completions``; ``GET /v1/models`` is answered here, once ``extproc_request_headers`` let it
   through), refuse a body over the size limit,
   strip the gateway's internal ``x-extproc-*`` headers a client may have sent, and call
   ``extproc_request_headers``.
2. **request body**: parse the OpenAI request (bad input gets an OpenAI-style 4xx), call
   ``extproc_request_parsed``, then ``extproc_choose_tier`` and ``extproc_adjust_tier``; have the
   tier's upstream kind (:mod:`extproc.upstreams`) build the upstream request, call
   ``extproc_before_upstream``, and send it on with the ``x-extproc-tier`` header set and Envoy's
   route cache cleared so the route is re-picked.
3. **response headers**: note the status; the upstream's translator says which headers change
   (content type, ``content-length`` where the body will change); add the gateway's own.
4. **response body**: the translator turns each chunk into OpenAI JSON or SSE (Triton's answer
   translated, an OpenAI upstream's passed on), calling ``extproc_response_chunk``; once the answer
   is complete, take its usage, price it, and call ``extproc_response_complete``.
5. **stream closed**: whatever happened, call ``extproc_request_finished`` once.

At any step a hook may answer instead (a :class:`~extproc.wire.decisions.Reply`, or an
:class:`~extproc.formats.openai.OpenAIError` raised), which Envoy sends as an ImmediateResponse.
"""

from __future__ import annotations

import functools
import time
import uuid
from extproc.formats import openai as oai
from extproc.framework.context import RequestContext, ResponseChunk, TierChoice
from extproc.framework.hookspecs import GatewayView, PluginFailure
from extproc.upstreams.base import ResponseTranslator, UpstreamCall, headers_not_forwarded
from extproc.upstreams.registry import upstream_for
from extproc.wire.decisions import Continue, Decision, Reply

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

    def __init__(self, gateway: GatewayView):
        self.gateway = gateway
        self.hooks = gateway.hooks
        self.ctx: RequestContext | None = None
        self.call: UpstreamCall | None = None  # the request to the tier's upstream, once built
        self._response: ResponseTranslator | None = None  # its answer's translator (None: left alone)
        self._chunks = 0

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

        self.call = upstream_for(tier).request(ctx)
        upstream = self.call.upstream
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
        # Only what the upstream needs goes on: the client's other headers are removed
        # (extproc/upstreams/base.py FORWARDED_REQUEST_HEADERS), so they can neither break the
        # upstream nor push the request past Envoy's header limits with the gateway's own.
        remove = headers_not_forwarded(ctx.headers, tier, headers)
        remove += [name for name in auth_remove if name not in remove]
        ctx.upstream_sent_at = time.perf_counter()
        return Continue(set_headers=headers, remove_headers=remove, body=upstream.body, clear_route_cache=True)

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
        translated, remove, self._response = self.call.response(status, ctx.stream)
        set_headers += translated
        set_headers += ctx.response_headers.items()
        if ctx.degraded:
            set_headers.append(("x-extproc-degraded", ",".join(ctx.degraded)))
        if end_of_stream:
            await self._finish_response(None)
        whole = not end_of_stream and getattr(self._response, "whole", False)
        return Continue(set_headers=set_headers, remove_headers=remove, whole_response_body=whole)

    # 4. response body -----------------------------------------------------------------------
    @_timed
    async def response_body(self, chunk: bytes, end_of_stream: bool) -> Decision:
        if self._response is None:  # not an answer of ours to translate
            return Continue()
        result = self._response.translate(chunk, end_of_stream)
        if result.usage is not None and not result.complete:  # what an OpenAI stream has reported so far
            self.ctx.usage = result.usage
        await self._chunk(result.text, result.sent)
        if result.complete:
            await self._finish_response(result.usage, error=result.error)
        status = [(":status", str(result.status))] if result.status is not None else []
        return Continue(set_headers=status, body=result.body)  # body None: the chunk goes on unchanged

    async def response_trailers(self, trailers: dict[str, str]) -> Decision:
        if self.ctx is not None and self.ctx.outcome == "pending" and self._response is not None:
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
        if usage is not None:  # per-1K token prices or GPU-hour apportioning: extproc/observability/cost_model.py
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

