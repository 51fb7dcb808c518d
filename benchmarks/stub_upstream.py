#!/usr/bin/env python3
"""A fast OpenAI-compatible stub upstream for benchmarks and tests.

Raw HTTP/1.1 on asyncio (Protocol API, keep-alive, pipelining-safe), no framework and no
third-party imports, so it stays out of the way of what is being measured.

    python benchmarks/stub_upstream.py --port 8100 [--workers 2] [--echo]

Endpoints
    POST /v1/chat/completions   fixed ``chat.completion`` JSON with ``usage``;
                                SSE ``chat.completion.chunk`` stream when ``"stream": true``
                                (a final usage chunk when ``stream_options.include_usage``)
    POST /v1/completions        same, ``text_completion`` shape
    GET  /v1/models             one model
    GET  /health, /v2/health/ready   200 (so it can stand in for a health-checked upstream)

``--echo`` adds ``"stub_request": {method, path, headers, body_bytes}`` to JSON answers and
``x-stub-*`` response headers, so tests can see what actually reached the upstream.
Request bodies may be Content-Length or chunked (Envoy re-chunks a replaced body).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time

MODEL = "stub-model"
CONTENT = "Hello from the stub upstream."
PROMPT_TOKENS = 12
COMPLETION_TOKENS = 7

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    500: "Internal Server Error",
}
MAX_BODY = 64 * 1024 * 1024


def _usage() -> dict:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    }


def _chat_completion(model: str) -> dict:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "stub",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": CONTENT},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(),
    }


def _text_completion(model: str) -> dict:
    return {
        "id": "cmpl-stub",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": CONTENT, "logprobs": None, "finish_reason": "stop"}],
        "usage": _usage(),
    }


def _sse_events(model: str, chunks: int, include_usage: bool, chat: bool) -> list[bytes]:
    created = int(time.time())
    words = CONTENT.split(" ")
    step = max(1, -(-len(words) // max(1, chunks)))
    pieces = [" ".join(words[i:i + step]) for i in range(0, len(words), step)]
    events = []
    for i, piece in enumerate(pieces):
        if chat:
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": " " + piece}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
            obj = "text_completion"
        events.append({"id": "chatcmpl-stub", "object": obj, "created": created, "model": model,
                       "choices": [choice]})
    last = dict(events[-1])
    last_choice = dict(last["choices"][0])
    last_choice["finish_reason"] = "stop"
    if chat:
        last_choice["delta"] = {}
    else:
        last_choice["text"] = ""
    last["choices"] = [last_choice]
    events.append(last)
    if include_usage:
        events.append({"id": "chatcmpl-stub", "object": events[0]["object"], "created": created,
                       "model": model, "choices": [], "usage": _usage()})
    out = [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events]
    out.append(b"data: [DONE]\n\n")
    return out


class StubProtocol(asyncio.Protocol):
    """One connection. Parses requests incrementally; answers in order."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a streamed answer is being written
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._drain()

    # -- parsing -----------------------------------------------------------------------
    def _drain(self) -> None:
        while not self.busy and not self.closed:
            req = self._parse_one()
            if req is None:
                return
            self._handle(*req)

    def _parse_one(self):
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 65536:
                self._simple(400, {"error": "headers too large"}, close=True)
            return None
        head = bytes(self.buf[:end]).decode("latin-1")
        lines = head.split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            self._simple(400, {"error": "bad request line"}, close=True)
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            k = k.strip().lower()
            v = v.strip()
            headers[k] = headers[k] + "," + v if k in headers else v
        pos = end + 4
        te = headers.get("transfer-encoding", "").lower()
        if "chunked" in te:
            body = bytearray()
            while True:
                le = self.buf.find(b"\r\n", pos)
                if le < 0:
                    return None
                size = int(bytes(self.buf[pos:le]).split(b";")[0] or b"0", 16)
                pos = le + 2
                if size == 0:
                    # optional trailers, ended by an empty line
                    te_end = self.buf.find(b"\r\n", pos)
                    while te_end >= 0 and te_end != pos:
                        pos = te_end + 2
                        te_end = self.buf.find(b"\r\n", pos)
                    if te_end < 0:
                        return None
                    pos = te_end + 2
                    break
                if len(self.buf) < pos + size + 2:
                    return None
                body += self.buf[pos:pos + size]
                pos += size + 2
                if len(body) > MAX_BODY:
                    self._simple(413, {"error": "too large"}, close=True)
                    return None
        else:
            n = int(headers.get("content-length", "0") or 0)
            if n > MAX_BODY:
                self._simple(413, {"error": "too large"}, close=True)
                return None
            if len(self.buf) < pos + n:
                return None
            body = self.buf[pos:pos + n]
            pos += n
        del self.buf[:pos]
        keep_alive = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        return method, target, headers, bytes(body), keep_alive

    # -- answering ---------------------------------------------------------------------
    def _write(self, status: int, headers: list[tuple[str, str]], body: bytes | None,
               close: bool) -> None:
        out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
        for k, v in headers:
            out.append(f"{k}: {v}\r\n")
        if body is not None:
            out.append(f"content-length: {len(body)}\r\n")
        if close:
            out.append("connection: close\r\n")
        out.append("\r\n")
        payload = "".join(out).encode("latin-1")
        if body:
            payload += body
        assert self.transport is not None
        self.transport.write(payload)
        if close:
            self.transport.close()
            self.closed = True

    def _simple(self, status: int, obj: dict, close: bool = False,
                extra: list[tuple[str, str]] | None = None) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self._write(status, [("content-type", "application/json")] + (extra or []), body, close)

    def _echo(self, method: str, path: str, headers: dict, body: bytes):
        info = {"method": method, "path": path, "headers": headers, "body_bytes": len(body)}
        extra = [("x-stub-path", path), ("x-stub-body-bytes", str(len(body)))]
        return info, extra

    def _handle(self, method: str, target: str, headers: dict, body: bytes,
                keep_alive: bool) -> None:
        path = target.split("?", 1)[0]
        close = not keep_alive
        echo_info, extra = (self._echo(method, target, headers, body) if self.opts.echo
                            else (None, []))
        if path in ("/health", "/v2/health/ready", "/v2/health/live"):
            self._write(200, [("content-type", "text/plain")] + extra, b"ok", close)
            return
        if path == "/v1/models":
            obj = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                               "owned_by": "stub"}]}
            self._simple(200, obj, close, extra)
            return
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._simple(404, {"error": {"message": f"stub: no such path {path}",
                                         "type": "invalid_request_error", "param": None,
                                         "code": "not_found"}}, close, extra)
            return
        if method != "POST":
            self._simple(405, {"error": {"message": "POST only", "type": "invalid_request_error",
                                         "param": None, "code": None}}, close, extra)
            return
        try:
            req = json.loads(body or b"{}")
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError as e:
            self._simple(400, {"error": {"message": f"stub: invalid JSON body: {e}",
                                         "type": "invalid_request_error", "param": None,
                                         "code": None}}, close, extra)
            return
        model = str(req.get("model") or MODEL)
        chat = path == "/v1/chat/completions"
        if req.get("stream"):
            include_usage = bool((req.get("stream_options") or {}).get("include_usage")) \
                or self.opts.always_usage
            events = _sse_events(model, self.opts.stream_chunks, include_usage, chat)
            self._stream(events, close, extra)
            return
        obj = _chat_completion(model) if chat else _text_completion(model)
        if echo_info is not None:
            obj["stub_request"] = echo_info
        self._simple(200, obj, close, extra)

    def _stream(self, events: list[bytes], close: bool, extra: list[tuple[str, str]]) -> None:
        hdrs = [("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                ("transfer-encoding", "chunked")] + extra
        self._write(200, hdrs, None, False)
        delay = self.opts.stream_delay_ms / 1000.0

        def chunk(b: bytes) -> bytes:
            return f"{len(b):x}\r\n".encode() + b + b"\r\n"

        if delay <= 0:
            assert self.transport is not None
            self.transport.write(b"".join(chunk(e) for e in events) + b"0\r\n\r\n")
            if close:
                self.transport.close()
                self.closed = True
            return

        self.busy = True

        async def run() -> None:
            try:
                for e in events:
                    if self.closed:
                        return
                    self.transport.write(chunk(e))  # type: ignore[union-attr]
                    await asyncio.sleep(delay)
                if not self.closed:
                    self.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
                    if close:
                        self.transport.close()  # type: ignore[union-attr]
                        self.closed = True
            finally:
                self.busy = False
                if not self.closed and self.buf:
                    self._drain()

        asyncio.get_running_loop().create_task(run())


def _make_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def _serve(opts: argparse.Namespace, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubProtocol(opts), sock=sock, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:
            pass
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--workers", type=int, default=1,
                    help="processes sharing the port (SO_REUSEPORT)")
    ap.add_argument("--echo", action="store_true",
                    help="echo what reached the upstream (stub_request field, x-stub-* headers)")
    ap.add_argument("--stream-chunks", type=int, default=4, help="content chunks per SSE answer")
    ap.add_argument("--stream-delay-ms", type=float, default=0.0,
                    help="delay between SSE chunks")
    ap.add_argument("--always-usage", action="store_true",
                    help="send the usage chunk on every stream, not only with include_usage")
    opts = ap.parse_args(argv)

    try:
        import uvloop  # type: ignore

        uvloop.install()
    except ImportError:
        pass

    sock = _make_socket(opts.host, opts.port)
    print(f"stub_upstream listening on {opts.host}:{opts.port} workers={opts.workers}",
          flush=True)
    children = []
    for _ in range(max(0, opts.workers - 1)):
        pid = os.fork()
        if pid == 0:
            asyncio.run(_serve(opts, sock))
            os._exit(0)
        children.append(pid)
    try:
        asyncio.run(_serve(opts, sock))
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
