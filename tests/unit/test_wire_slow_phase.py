"""A phase that takes longer than Envoy's message timeout asks Envoy for more time, once per message."""

from __future__ import annotations

import asyncio

import grpc

from extproc.wire import processor as wire
from extproc.wire.decisions import Continue, Reply
from extproc.wire.processor import ExternalProcessor, add_to_server

from .test_wire import chat_body, exchange, request_phases


class SlowBody:
    def __init__(self, delay: float):
        self.delay = delay

    async def request_headers(self, headers, end_of_stream):
        return Continue()

    async def request_body(self, body, end_of_stream):
        await asyncio.sleep(self.delay)
        return Reply(200, b"{}", [("content-type", "application/json")])

    async def stream_closed(self, cancelled):
        pass

    def internal_error(self, exc):
        return Reply(500, b"{}")


async def _run(handler):
    server = grpc.aio.server()
    add_to_server(ExternalProcessor(lambda: handler), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await exchange(channel, request_phases(chat_body()))
    finally:
        await server.stop(0)


async def test_slow_phase_sends_one_timeout_extension_before_its_answer(monkeypatch):
    monkeypatch.setattr(wire, "EXTEND_AFTER_SECONDS", 0.05)
    answers = await _run(SlowBody(0.3))
    kinds = [a.WhichOneof("response") or ("extension" if a.HasField("override_message_timeout") else None)
             for a in answers]
    assert kinds == ["request_headers", "extension", "immediate_response"]
    assert answers[1].override_message_timeout.seconds == wire.EXTENDED_MESSAGE_TIMEOUT_SECONDS


async def test_fast_phase_sends_no_extension(monkeypatch):
    monkeypatch.setattr(wire, "EXTEND_AFTER_SECONDS", 0.5)
    answers = await _run(SlowBody(0.0))
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "immediate_response"]


def test_extension_matches_envoy_max_message_timeout():
    from extproc.commands.stack import project_root

    text = (project_root() / "envoy" / "envoy.yaml").read_text()
    assert f"max_message_timeout: {wire.EXTENDED_MESSAGE_TIMEOUT_SECONDS}s" in text
    assert "message_timeout: 2s" in text and wire.EXTEND_AFTER_SECONDS < 2
