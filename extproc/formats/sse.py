"""Server-sent events: an incremental parser and an encoder.

The parser follows the WHATWG event-stream rules (lines end with \\r\\n, \\n or \\r; a blank
line dispatches; `:` starts a comment; one space after the colon is dropped; data lines are
joined with \\n) and accepts its input split anywhere, including inside a UTF-8 character
or between \\r and \\n. Lines are split on bytes and decoded only when complete, which is
safe because \\r and \\n never occur inside a multi-byte UTF-8 sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.formats.openai import dumps

__all__ = ["SSEEvent", "SSEParser", "encode_event", "DONE"]

DONE: bytes = b"data: [DONE]\n\n"

_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event. `id` is the `id:` field of this event only (not sticky)."""

    data: str
    event: str | None = None
    id: str | None = None


class SSEParser:
    """Incremental SSE parser: feed bytes as they arrive, get the events they complete."""

    __slots__ = ("_pending", "_skip_lf", "_data", "_event", "_id", "_started")

    def __init__(self) -> None:
        self._pending: list[bytes] = []  # bytes of the current, unterminated line
        self._skip_lf = False  # the previous chunk ended with \r: drop a leading \n
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._started = False  # past the optional leading BOM

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume `chunk`; return the events it completed (possibly none)."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        if not self._started:
            head = b"".join(self._pending) + chunk
            if len(head) < 3 and _BOM.startswith(head):
                self._pending = [head]
                return []
            self._started = True
            self._pending = []
            chunk = head[3:] if head.startswith(_BOM) else head
            if not chunk:
                return []
        if b"\n" not in chunk and b"\r" not in chunk:
            self._pending.append(chunk)
            return []
        if self._pending:
            self._pending.append(chunk)
            chunk = b"".join(self._pending)
            self._pending = []
        lines = chunk.splitlines(keepends=True)
        last = lines[-1]
        if last[-1:] not in (b"\n", b"\r"):
            self._pending.append(last)
            lines.pop()
        elif last[-1:] == b"\r":
            self._skip_lf = True
        out: list[SSEEvent] = []
        for raw in lines:
            self._line(raw.rstrip(b"\r\n"), out)
        return out

    def flush(self) -> list[SSEEvent]:
        """At end of stream: process an unterminated last line and dispatch a pending event."""
        out: list[SSEEvent] = []
        if self._pending:
            rest = b"".join(self._pending)
            self._pending = []
            if not self._started and rest.startswith(_BOM):
                rest = rest[3:]
            if rest:
                self._line(rest, out)
        self._skip_lf = False
        self._started = True
        self._dispatch(out)
        return out

    def _line(self, raw: bytes, out: list[SSEEvent]) -> None:
        if not raw:
            self._dispatch(out)
            return
        if raw[0] == 0x3A:  # ':' comment
            return
        line = raw.decode("utf-8", "replace")
        colon = line.find(":")
        if colon < 0:
            field, value = line, ""
        else:
            field = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == " ":
                value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\0" not in value:
                self._id = value
        # "retry" and unknown fields are ignored

    def _dispatch(self, out: list[SSEEvent]) -> None:
        if self._data:
            out.append(SSEEvent("\n".join(self._data), self._event, self._id))
        self._data = []
        self._event = None
        self._id = None


def encode_event(data: str | bytes | dict | list, *, event: str | None = None, id: str | None = None) -> bytes:
    """Encode one event: `b"data: ...\\n\\n"` (dict/list -> compact JSON; multi-line data
    becomes several `data:` lines). Optional `event:` and `id:` fields come first."""
    if isinstance(data, (dict, list)):
        body = dumps(data)
    elif isinstance(data, str):
        body = data.encode("utf-8", "replace")
    else:
        body = bytes(data)
    head = b""
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    if id is not None:
        head += b"id: " + id.encode() + b"\n"
    if b"\n" in body or b"\r" in body:
        lines = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return head + b"".join(b"data: " + ln + b"\n" for ln in lines) + b"\n"
    return head + b"data: " + body + b"\n\n"
