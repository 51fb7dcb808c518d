"""The ext_proc stream state machine: Envoy's ``ExternalProcessor/Process`` over grpc.aio.

One gRPC stream carries one HTTP request. Each message Envoy sends is one phase (request headers,
request body, request trailers, response headers, response body chunk, response trailers); each gets
exactly one answer, even an empty final body chunk. The servicer knows nothing of OpenAI or of
policies: it turns each message into a call on a :class:`StreamHandler` built for the stream, and
the handler's :mod:`~extproc.wire.decisions` back into ext_proc messages.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2

from extproc.wire.decisions import Continue, Decision, Reply

log = logging.getLogger(__name__)

#: A phase still being handled after this many seconds asks Envoy for more time (Envoy's
#: ``message_timeout`` is 2 s): a policy may legitimately wait, e.g. for an identical request's
#: answer (coalescing). Sent at most once per message, as Envoy allows.
EXTEND_AFTER_SECONDS = 1.0
#: The time asked for: Envoy's ``max_message_timeout`` in envoy/envoy.yaml (30 s); Envoy ignores
#: a larger override.
EXTENDED_MESSAGE_TIMEOUT_SECONDS = 30

Headers = dict[str, str]

_Mode = processing_mode_pb2.ProcessingMode
#: The processing mode of a request the service lets through: the same request phases as
#: envoy/envoy.yaml, and the response phases turned on (headers, the body streamed, trailers).
#: Envoy's static mode has the response phases OFF, so that a response Envoy makes up itself
#: before the service has let the request through never waits on the service. That matters for
#: a codec error (HTTP/1.0, too many or too large headers, Content-Length with chunked, a bad chunk
#: size, an unknown method): Envoy sends its local reply and resets the stream at once, so a
#: response phase still waiting for the service loses the reply (zero bytes, the connection closed
#: after Envoy's 1 s delayed close). Sent as ``mode_override`` on every request-headers answer
#: that continues (the only answers where Envoy honours it; ``allow_mode_override`` and
#: ``allowed_override_modes`` in envoy/envoy.yaml admit exactly this mode).
FORWARDED_MODE = _Mode(
    request_header_mode=_Mode.SEND, request_body_mode=_Mode.BUFFERED, request_trailer_mode=_Mode.SKIP,
    response_header_mode=_Mode.SEND, response_body_mode=_Mode.STREAMED, response_trailer_mode=_Mode.SEND,
)
#: The same, with the response body sent whole (``Continue.whole_response_body``): asked for in
#: the answer to the response headers of an answer the client gets in one piece. The other mode
#: ``allowed_override_modes`` admits.
WHOLE_RESPONSE_MODE = _Mode(
    request_header_mode=_Mode.SEND, request_body_mode=_Mode.BUFFERED, request_trailer_mode=_Mode.SKIP,
    response_header_mode=_Mode.SEND, response_body_mode=_Mode.BUFFERED, response_trailer_mode=_Mode.SEND,
)


class StreamHandler(Protocol):
    """What the wire layer calls for one HTTP request; every method returns a decision."""

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Decision: ...
    async def request_body(self, body: bytes, end_of_stream: bool) -> Decision: ...
    async def request_trailers(self, trailers: Headers) -> Decision: ...
    async def response_headers(self, headers: Headers, end_of_stream: bool) -> Decision: ...
    async def response_body(self, chunk: bytes, end_of_stream: bool) -> Decision: ...
    async def response_trailers(self, trailers: Headers) -> Decision: ...
    async def stream_closed(self, cancelled: bool) -> None:
        """The gRPC stream ended; ``cancelled`` when Envoy (or the client behind it) went away."""

    def internal_error(self, exc: BaseException) -> Reply:
        """The reply for a bug in the handler itself (never for a policy's own failure)."""


def header_map(msg) -> Headers:
    """Envoy's HeaderMap as a dict of lower-case names; repeated headers are joined with ','."""
    out: Headers = {}
    for h in msg.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _header_mutation(set_headers, remove_headers) -> pb.HeaderMutation:
    # Nested dicts rather than a HeaderValue and a HeaderValueOption object per header: the same
    # message, built in half the time (every forwarded request has two or three of these).
    return pb.HeaderMutation(
        set_headers=[{"header": {"key": k, "raw_value": v.encode()}, "append_action": _OVERWRITE}
                     for k, v in set_headers],
        remove_headers=remove_headers,
    )


def common_response(decision: Continue) -> pb.CommonResponse:
    """A :class:`Continue` as the CommonResponse of a headers or body answer."""
    common = pb.CommonResponse(clear_route_cache=decision.clear_route_cache)
    if decision.set_headers or decision.remove_headers:
        common.header_mutation.CopyFrom(_header_mutation(decision.set_headers, decision.remove_headers))
    if decision.body is not None:
        if decision.body:
            common.body_mutation.body = decision.body
        else:
            common.body_mutation.clear_body = True
    return common


def immediate_response(reply: Reply) -> pb.ProcessingResponse:
    """A :class:`Reply` as Envoy's ImmediateResponse."""
    imm = pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=reply.status),
        body=reply.body,
        details=reply.details or "extproc_reply",
    )
    if reply.headers:
        imm.headers.CopyFrom(_header_mutation(reply.headers, ()))
    return pb.ProcessingResponse(immediate_response=imm)


def _answer(phase: str, decision: Decision) -> pb.ProcessingResponse:
    if isinstance(decision, Reply):
        return immediate_response(decision)
    if phase in ("request_trailers", "response_trailers"):
        trailers = pb.TrailersResponse()
        if decision.set_headers or decision.remove_headers:
            trailers.header_mutation.CopyFrom(_header_mutation(decision.set_headers, decision.remove_headers))
        return pb.ProcessingResponse(**{phase: trailers})
    common = common_response(decision)
    if phase == "request_headers":  # the request goes on: its response phases are wanted
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common),
                                     mode_override=FORWARDED_MODE)
    if phase == "response_headers" and decision.whole_response_body:
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common),
                                     mode_override=WHOLE_RESPONSE_MODE)
    if phase.endswith("_headers"):
        return pb.ProcessingResponse(**{phase: pb.HeadersResponse(response=common)})
    return pb.ProcessingResponse(**{phase: pb.BodyResponse(response=common)})


_HEADER_PHASES = frozenset({"request_headers", "response_headers"})
_BODY_PHASES = frozenset({"request_body", "response_body"})
_TRAILER_PHASES = frozenset({"request_trailers", "response_trailers"})


@dataclass(slots=True)
class StreamState:
    """What the servicer tracks for one gRPC stream (one HTTP request)."""

    handler: StreamHandler
    phases: int = 0
    replied: bool = False
    extending: "asyncio.Future | None" = None  # the override_message_timeout being written


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """The ext_proc servicer: one :class:`StreamHandler` per stream from ``handler_factory``."""

    def __init__(self, handler_factory: Callable[[], StreamHandler]):
        self._new_handler = handler_factory
        self.active_streams = 0
        self.streams = 0  # streams handled
        self.streams_cancelled = 0  # ...that ended cancelled (Envoy reset it) rather than half-closed

    async def Process(self, request_iterator, context):
        state = StreamState(self._new_handler())
        loop = asyncio.get_running_loop()
        self.active_streams += 1
        cancelled = True
        try:
            # context.read()/write() rather than an async generator: one less layer per message.
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    break
                timer = loop.call_later(EXTEND_AFTER_SECONDS, self._extend, state, context)
                try:
                    answer = await self._phase(state, request)
                finally:
                    timer.cancel()
                if state.extending is not None:  # let the extension go out before the answer
                    extending, state.extending = state.extending, None
                    try:
                        await extending
                    except Exception:  # the stream broke; the answer's write will say so
                        pass
                if answer is None:
                    continue
                state.phases += 1
                await context.write(answer)
                if answer.HasField("immediate_response"):
                    state.replied = True
                    break
                if _is_last_message(request):
                    # Nothing more will come: end the RPC now (status OK) instead of waiting for
                    # Envoy's half-close, which can lose the race with Envoy resetting the stream
                    # when its filter is destroyed (a reset stream costs grpcio native memory).
                    # Envoy ignores the stream once the server has closed it.
                    break
            cancelled = False
        finally:
            self.active_streams -= 1
            self.streams += 1
            self.streams_cancelled += cancelled
            try:
                await state.handler.stream_closed(cancelled and not state.replied)
            except Exception:  # the stream is over; nothing left to answer
                log.exception("stream_closed failed")

    @staticmethod
    def _extend(state: StreamState, context) -> None:
        """The phase is slow: ask Envoy to extend this message's timeout (once per message)."""
        state.extending = asyncio.ensure_future(context.write(_EXTEND_MESSAGE))

    async def _phase(self, state: StreamState, request: pb.ProcessingRequest):
        phase = request.WhichOneof("request")
        handler = state.handler
        try:
            # The handler's methods are named after the phases they answer.
            if phase in _HEADER_PHASES:
                m = getattr(request, phase)
                decision = await getattr(handler, phase)(header_map(m.headers), m.end_of_stream)
            elif phase in _BODY_PHASES:
                m = getattr(request, phase)
                decision = await getattr(handler, phase)(m.body, m.end_of_stream)
            elif phase in _TRAILER_PHASES:
                decision = await getattr(handler, phase)(header_map(getattr(request, phase).trailers))
            else:  # a message with no phase we know (newer Envoy): nothing to answer
                log.warning("ext_proc message without a known phase: %s", phase)
                return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the handler: answer, never leave Envoy waiting
            log.exception("handler failed in %s", phase)
            decision = handler.internal_error(exc)
        return _answer(phase, decision)


def _is_last_message(request: pb.ProcessingRequest) -> bool:
    """Is this the last message Envoy sends on the stream (the response is complete)?"""
    phase = request.WhichOneof("request")
    if phase == "response_trailers":
        return True
    if phase in ("response_body", "response_headers"):
        return getattr(request, phase).end_of_stream
    return False


_EXTEND_MESSAGE = pb.ProcessingResponse(
    override_message_timeout=duration_pb2.Duration(seconds=EXTENDED_MESSAGE_TIMEOUT_SECONDS))


def add_to_server(servicer: ExternalProcessor, server: grpc.aio.Server) -> None:
    """Register the ext_proc servicer on a grpc.aio server."""
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
