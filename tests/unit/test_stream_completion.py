"""A streamed answer is complete when ``[DONE]`` goes out, not only at the upstream's end of stream.

With real Envoy the upstream's last SSE event and its end of stream arrive as separate body
chunks (the terminating chunk of chunked encoding comes on its own). A client that closes as soon
as it reads ``[DONE]`` (the OpenAI SDK does) may reset the stream before that empty chunk
reaches the gateway: the request still completed, and its usage counts as such.
"""

from __future__ import annotations

import json

import yaml

from extproc.framework.config import default_config_text
from extproc.framework.testing import GatewayHarness, triton_answer

ANSWER = "one two three"  # the fake Triton answer: 5 prompt tokens, a completion token per word


def config() -> dict:
    cfg = yaml.safe_load(default_config_text())
    cfg["tiers"]["hosted"] = {"model": "gpt-4o-mini", "kind": "openai"}
    cfg["plugins"] = [{"name": "model_tiers"}]
    return cfg


async def test_triton_stream_completes_when_the_client_leaves_after_done():
    events = triton_answer(ANSWER)
    async with GatewayHarness(config=config()) as gw:
        # the client goes away after the last event, before the empty end-of-stream chunk
        result = await gw.chat("hi", model="small", stream=True, upstream_chunks=[*events, b""],
                               abort_after_chunks=len(events))
    assert result.body.endswith(b"data: [DONE]\n\n")
    assert result.ctx.outcome == "completed"
    assert (result.ctx.usage.prompt_tokens, result.ctx.usage.completion_tokens) == (5, 3)
    assert result.ctx.cost_usd is not None


async def test_triton_stream_cut_before_done_is_still_aborted():
    events = triton_answer(ANSWER)
    async with GatewayHarness(config=config()) as gw:
        result = await gw.chat("hi", model="small", stream=True, upstream_chunks=[*events, b""],
                               abort_after_chunks=len(events) - 1)
    assert b"[DONE]" not in result.body
    assert result.ctx.outcome == "aborted"


def _openai_sse() -> list[bytes]:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
             "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    final = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in (chunk, final, usage)] + [b"data: [DONE]\n\n"]


async def test_openai_stream_completes_when_the_client_leaves_after_done():
    events = _openai_sse()
    async with GatewayHarness(config=config()) as gw:
        result = await gw.chat("hi", model="hosted", stream=True, upstream_chunks=[*events, b""],
                               abort_after_chunks=len(events))
    assert result.ctx.outcome == "completed"
    assert (result.ctx.usage.prompt_tokens, result.ctx.usage.completion_tokens) == (7, 2)


async def test_openai_stream_cut_before_done_is_still_aborted():
    events = _openai_sse()
    async with GatewayHarness(config=config()) as gw:
        result = await gw.chat("hi", model="hosted", stream=True, upstream_chunks=[*events, b""],
                               abort_after_chunks=len(events) - 1)
    assert result.ctx.outcome == "aborted"
