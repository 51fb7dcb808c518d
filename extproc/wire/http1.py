"""Reading one HTTP/1.1 response off an asyncio stream, for the gateway's own small clients
(Triton's ``/metrics``, the Triton embedder): status line, headers, and a body framed by
``Transfer-Encoding: chunked``, ``Content-Length`` or, without either, the connection's close.

Malformed answers raise :class:`ValueError` (the callers turn it into their own error);
a connection closed mid-body raises :class:`asyncio.IncompleteReadError`.
"""

from __future__ import annotations

import asyncio

__all__ = ["read_response"]


async def read_response(reader: asyncio.StreamReader, *,
                        keep_alive: bool = False) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers, body)``; header names in lower case. ``keep_alive``: a body with
    neither length nor chunking is empty (the connection stays usable) instead of read to close."""
    status_line = await reader.readline()
    if not status_line:
        raise ValueError("the server closed the connection before answering")
    fields = status_line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        raise ValueError(f"not an HTTP status line: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(fields[1]), headers, await _read_body(reader, headers, keep_alive)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], keep_alive: bool) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise ValueError("connection closed inside a chunked body")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return bytes(out)
            out += await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after each chunk
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return b"" if keep_alive else await reader.read()
