"""One attempt of a request over HTTP: send it, read the answer as the client would, measure it.

A JSON answer's time to first token is its latency (nothing reaches the client before the whole
answer). A streamed answer's is the time to the first SSE ``data:`` chunk that carries text
(``choices[0].delta.content`` for chat, ``choices[0].text`` for completions): the role-only first
chunk and keep-alive comments do not count. Token counts are the answer's ``usage``; a stream is
asked for it with ``stream_options: {include_usage: true}`` and reports it in its last chunk.

The timeout is the OpenAI SDK's: httpx's read timeout, i.e. no byte for ``timeout_s`` seconds
(for a JSON answer, which arrives whole, that is the time to the answer).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from extproc.formats.sse import SSEParser
from extproc.lab.runner.records import CAPTURED_HEADERS, Attempt

RETRY_HEADER = "x-stainless-retry-count"  #: what the OpenAI SDK sends; the gateway books retries by it


def request_body(body: dict, stream: bool) -> dict:
    """The body as sent: ``stream`` as planned, and for a stream, usage asked for in the last chunk."""
    out = dict(body)
    out["stream"] = stream
    if stream:
        options = dict(out.get("stream_options") or {})
        options.setdefault("include_usage", True)
        out["stream_options"] = options
    else:
        out.pop("stream_options", None)
    return out


def _error_code(payload) -> str | None:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        return str(err.get("code") or err.get("type") or "error")
    return None


def _content(chunk: dict) -> str:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        text = (delta or {}).get("content") if delta is not None else choice.get("text")
        if text:
            return text
    return ""


def _usage(attempt: Attempt, usage) -> None:
    if isinstance(usage, dict):
        attempt.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        attempt.completion_tokens = int(usage.get("completion_tokens") or 0)


async def send(client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str], *, stream: bool,
               number: int, timeout_s: float, t0: float, attempts: list[Attempt] | None = None) -> Attempt:
    """Send one attempt and measure it; never raises for what the network or the server does.

    :param t0: the run's start (``time.perf_counter()``), for :attr:`Attempt.started`.
    :param attempts: the attempt is appended to it as soon as it starts, so that an attempt
        cancelled by the end of the run is still recorded (``error="cancelled"``).
    """
    sent = dict(headers)
    sent[RETRY_HEADER] = str(number)
    start = time.perf_counter()
    attempt = Attempt(number=number, started=start - t0)
    if attempts is not None:
        attempts.append(attempt)
    try:
        await _exchange(client, url, body, sent, stream, timeout_s, attempt, start)
    except asyncio.CancelledError:
        attempt.error = attempt.error or "cancelled"
        attempt.latency_s = time.perf_counter() - start
        raise
    return attempt


async def _exchange(client: httpx.AsyncClient, url: str, body: dict, sent: dict[str, str], stream: bool,
                    timeout_s: float, attempt: Attempt, start: float) -> None:
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
    try:
        async with client.stream("POST", url, json=request_body(body, stream), headers=sent,
                                 timeout=timeout) as reply:
            attempt.status = reply.status_code
            attempt.headers = {h: reply.headers[h] for h in CAPTURED_HEADERS if h in reply.headers}
            is_sse = reply.headers.get("content-type", "").startswith("text/event-stream")
            if is_sse and reply.status_code < 300:
                await _read_sse(reply, attempt, start)
            else:
                raw = await reply.aread()
                attempt.latency_s = attempt.ttft_s = time.perf_counter() - start
                try:
                    payload = json.loads(raw) if raw else None
                except ValueError:
                    payload = None
                    if reply.status_code < 300:
                        attempt.error = "body: not JSON"
                if reply.status_code >= 300:
                    attempt.error = _error_code(payload) or f"http {reply.status_code}"
                elif isinstance(payload, dict):
                    _usage(attempt, payload.get("usage"))
    except httpx.TimeoutException:
        attempt.error = "timeout"
    except httpx.TransportError as exc:
        attempt.error = f"transport: {type(exc).__name__}"
    if attempt.latency_s is None:
        attempt.latency_s = time.perf_counter() - start


async def _read_sse(reply: httpx.Response, attempt: Attempt, start: float) -> None:
    parser = SSEParser()
    done = False
    async for data in reply.aiter_bytes():
        for event in parser.feed(data):
            if event.data == "[DONE]":
                done = True
                continue
            try:
                chunk = json.loads(event.data)
            except ValueError:
                attempt.error = "stream: a chunk is not JSON"
                continue
            if not isinstance(chunk, dict):
                continue
            code = _error_code(chunk)
            if code is not None:
                attempt.error = f"stream: {code}"
            if _content(chunk):
                attempt.chunks += 1
                if attempt.ttft_s is None:
                    attempt.ttft_s = time.perf_counter() - start
            _usage(attempt, chunk.get("usage"))
    attempt.latency_s = time.perf_counter() - start
    if not done and attempt.error is None:
        attempt.error = "stream: ended without [DONE]"
