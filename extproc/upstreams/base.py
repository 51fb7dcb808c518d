"""The interface every upstream kind implements, and what all kinds share.

An :class:`Upstream` (one per kind, stateless, in the registry) knows how a tier of its kind is
called: :meth:`Upstream.request` rewrites one OpenAI request for the tier and returns an
:class:`UpstreamCall`, which then translates that request's answer, chunk by chunk, back into
OpenAI JSON or SSE (:class:`Translated`: the bytes to send, the text they add, and, once the answer
is complete, its usage or error). The request lifecycle only orchestrates: it never looks at a kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from extproc.formats import triton as triton_format
from extproc.formats.openai import OpenAIError

if TYPE_CHECKING:
    from extproc.formats.openai import OpenAIRequest
    from extproc.formats.openai import Usage
    from extproc.framework.config import TierConfig
    from extproc.framework.context import RequestContext

Headers = list[tuple[str, str]]

#: The client's request headers an upstream gets: tracing context only. Every other header the
#: client sent is removed from the upstream request (the gateway sets what the upstream needs:
#: ``:path``, ``content-type``, ``content-length``, the tier's own ``authorization``), so a client's
#: cookies, a huge custom header (Triton drops a connection whose request has a header of 8 KiB or
#: more) or a hundred of them never reach, or break, an upstream. Envoy's own headers are left to
#: Envoy (``:``-pseudo-headers; ``host``, which each tier route rewrites to its cluster's host;
#: ``x-forwarded-proto``, which Envoy sets and routes with; ``x-envoy-*``, which Envoy strips from
#: clients in envoy/envoy.yaml and ext_proc may not touch).
FORWARDED_REQUEST_HEADERS = frozenset({
    "x-request-id",                                   # Envoy's request id (also the gateway's)
    "traceparent", "tracestate", "baggage",           # W3C trace context
    "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",  # Zipkin
    "x-ot-span-context", "x-cloud-trace-context", "grpc-trace-bin",
})
#: ...and these for a tier with ``forward_authorization`` (its upstream authenticates the end user:
#: the user's key and the account it bills). Without it the client's ``authorization`` never goes
#: upstream (the tier's ``api_key_env`` key replaces it, or nothing).
FORWARDED_AUTH_HEADERS = frozenset({"authorization", "openai-organization", "openai-project"})
#: A forwarded header longer than this (name and value) is refused with a 431: Triton drops a
#: request with a header of 8 KiB.
MAX_FORWARDED_HEADER_BYTES = 4096
#: The upstream request's headers in all (the client's that stay, Host included, and the gateway's),
#: well inside Envoy's ``max_request_headers_kb`` (60 KiB): over it Envoy would refuse the service's
#: header mutation (a 503), so the client gets a 431 instead.
MAX_UPSTREAM_HEADER_BYTES = 48 * 1024


#: Headers Envoy itself needs on the request: route matching finds no route at all without
#: ``x-forwarded-proto`` (measured: route_not_found for every request).
_ENVOY_NEEDS = frozenset({"host", "x-forwarded-proto"})


def _envoy_owned(name: str) -> bool:
    return name[:1] == ":" or name in _ENVOY_NEEDS or name.startswith("x-envoy-")


def _too_large(message: str, param: str | None) -> OpenAIError:
    return OpenAIError(431, message, param=param, code="header_too_large")


def headers_not_forwarded(client_headers: dict[str, str], tier: "TierConfig", set_headers: Headers) -> list[str]:
    """The client's headers to remove from the upstream request: all but the forwarded ones
    (:data:`FORWARDED_REQUEST_HEADERS`) and those the gateway sets itself (``set_headers``).
    Refused with an OpenAIError 431: a forwarded header over :data:`MAX_FORWARDED_HEADER_BYTES`,
    or an upstream request whose headers would exceed :data:`MAX_UPSTREAM_HEADER_BYTES`."""
    forwarded = FORWARDED_REQUEST_HEADERS | FORWARDED_AUTH_HEADERS if tier.forward_authorization \
        else FORWARDED_REQUEST_HEADERS
    setting = {name for name, _ in set_headers}
    total = sum(len(name) + len(value) for name, value in set_headers)
    remove = []
    for name, value in client_headers.items():
        if name in setting:
            continue
        size = len(name) + len(value)
        if _envoy_owned(name):
            total += size
        elif name not in forwarded:
            remove.append(name)
        elif size > MAX_FORWARDED_HEADER_BYTES:
            raise _too_large(f"Request header '{name}' is {size} bytes; the gateway forwards headers of at "
                             f"most {MAX_FORWARDED_HEADER_BYTES} bytes to the model server.", name)
        else:
            total += size
    if total > MAX_UPSTREAM_HEADER_BYTES:
        raise _too_large(f"The request's headers are too large to forward ({total} bytes of headers for the "
                         f"model server, at most {MAX_UPSTREAM_HEADER_BYTES}).", None)
    return remove


@dataclass(slots=True)
class UpstreamRequest:
    """The request as it will go to the tier's Envoy cluster; hooks may change it in place."""

    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Translated:
    """What one response body chunk becomes on its way to the client."""

    body: bytes | None = None  #: replaces the chunk (``b""`` holds it back); None sends it unchanged
    sent: bytes = b""  #: what the client receives with this chunk (for ``extproc_response_chunk``)
    text: str = ""  #: the answer text the chunk adds
    complete: bool = False  #: the answer is complete (``usage`` or ``error`` below)
    usage: "Usage | None" = None  #: the token usage, once known
    error: bytes | None = None  #: the OpenAI error the client got instead of an answer
    status: int | None = None  #: the status the client gets instead (a whole body only, see WholeBody)


class ResponseTranslator(Protocol):
    """Translates one answer's body, chunk by chunk."""

    def translate(self, chunk: bytes, end_of_stream: bool) -> Translated: ...


class UpstreamCall(Protocol):
    """One request to an upstream: the request as sent, and how its answer comes back."""

    upstream: UpstreamRequest

    def response(self, status: int, stream: bool) -> tuple[Headers, list[str], ResponseTranslator]:
        """At the response headers: (headers to set, headers to remove, the body's translator)."""


class Upstream(Protocol):
    """An upstream kind: how a tier of this kind is called."""

    kind: str
    takes_api_key: bool  #: whether a tier of this kind may set ``api_key_env``
    exports_triton_metrics: bool  #: whether its server exports Triton's metrics (queue depth, batch sizes)

    def default_max_tokens(self, tier: "TierConfig") -> int | None:
        """What the upstream generates when the client sets no limit (None: the upstream decides)."""

    def auth_headers(self, name: str, tier: "TierConfig") -> tuple[Headers, list[str]]:
        """(headers to set, headers to remove) for the upstream's authentication; checked at start-up."""

    def prompt_tokens(self, tier: "TierConfig", request: "OpenAIRequest") -> int:
        """The request's prompt tokens as this upstream will count (and bill) them, or an upper
        bound: what budgets reserve before the call."""

    def request(self, ctx: "RequestContext") -> UpstreamCall:
        """Rewrite ``ctx.request`` for ``ctx.tier_config``; raise OpenAIError for what it cannot honour."""


class WholeBody:
    """Keeps the chunks until the end of the body, then translates the whole of it once.

    With ``hold_back`` (the body will be replaced) the client gets nothing before the end, so
    Envoy is asked for the body whole (``whole``: ``Continue.whole_response_body``): it holds the
    response headers meanwhile, the translation may still set the status, and an upstream that
    fails half-way is Envoy's error status, not a cut body behind a 200."""

    def __init__(self, translate_whole, *, hold_back: bool):
        self._translate_whole = translate_whole
        self._hold_back = hold_back  # send nothing until the end (the body will be replaced)
        self.whole = hold_back
        self._buffer = bytearray()

    def translate(self, chunk: bytes, end_of_stream: bool) -> Translated:
        self._buffer += chunk
        if not end_of_stream:
            return Translated(body=b"" if self._hold_back else None)
        return self._translate_whole(bytes(self._buffer))


def error_response(status: int) -> tuple[Headers, list[str], ResponseTranslator]:
    """Any kind's answer with a status other than 200: its body as an OpenAI error, in JSON."""

    def whole(body: bytes) -> Translated:
        out = as_openai_error(status, body)
        return Translated(body=out, complete=True, error=out)

    return [("content-type", "application/json")], ["content-length"], WholeBody(whole, hold_back=True)


def as_openai_error(status: int | None, body: bytes) -> bytes:
    """An upstream's error body in OpenAI's format (kept as is when it already is, as Envoy's are)."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        return body
    return triton_format.error_from_triton(status or 502, body).to_json()
