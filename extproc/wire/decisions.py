"""The plain decisions a request phase ends in: continue (with mutations) or answer now.

This module imports nothing from the project: the wire layer turns these into ext_proc messages,
the framework and the policies produce them, and neither has to know the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

JSON_HEADERS = (("content-type", "application/json"),)


@dataclass(slots=True)
class Continue:
    """Let the request or response go on, changed as described.

    :param set_headers: headers to set (overwriting), as ``(name, value)`` pairs.
    :param remove_headers: header names to remove.
    :param body: the new body (or body chunk) to send instead; ``None`` leaves it untouched.
    :param clear_route_cache: make Envoy pick the route again after the header changes.
    :param whole_response_body: (an answer to the response headers only) Envoy holds the response
        headers and sends the whole body in one message, so that the answer to it may still change
        the headers (``:status`` included), and an upstream failing before its end is answered by
        Envoy with an error status instead of a cut body behind a 200.
    """

    set_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: list[str] = field(default_factory=list)
    body: bytes | None = None
    clear_route_cache: bool = False
    whole_response_body: bool = False


@dataclass(slots=True)
class Reply:
    """Answer the client now, without (or instead of) the upstream: Envoy's ImmediateResponse.

    :param status: HTTP status code.
    :param body: the response body.
    :param headers: extra response headers, as ``(name, value)`` pairs.
    :param details: a short reason Envoy records in its access log (``%RESPONSE_CODE_DETAILS%``).
    """

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    details: str = ""

    @classmethod
    def json(cls, status: int, obj: object, *, headers=(), details: str = "") -> "Reply":
        """A JSON reply (``content-type: application/json``)."""
        body = json.dumps(obj, separators=(",", ":")).encode()
        return cls(status, body, [*JSON_HEADERS, *headers], details)


Decision = Continue | Reply
