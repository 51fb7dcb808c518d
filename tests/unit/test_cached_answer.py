"""Capturing answers as they go to the client, storing them, and replaying them as JSON or SSE."""

from __future__ import annotations

import json

import pytest

from extproc.formats import openai as oai
from extproc_plugins.caching.cached_answer import AnswerCapture, CachedAnswer, render, serve
from extproc.framework.context import RequestContext
from extproc.formats.sse import SSEParser, encode_event
from extproc.formats.triton import StreamTranslator


def chat_req(stream=False, include_usage=False):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return oai.parse_request("chat", json.dumps(body).encode())


def translated_stream(words, finish="stop") -> list[bytes]:
    """What the gateway sends the client for a streamed Triton answer, chunk by chunk."""
    t = StreamTranslator(req=chat_req(stream=True), completion_id="chatcmpl-1", created=7, model="llm-small")
    out = []
    for i, w in enumerate(words):
        ev = {"text_output": w, "prompt_tokens": 3, "completion_tokens": i + 1,
              "finish_reason": finish if i == len(words) - 1 else ""}
        out.append(t.feed(b"data: " + json.dumps(ev).encode() + b"\n\n"))
    out.append(t.finish())
    return [c for c in out if c]


def test_capture_streamed_answer_even_split_mid_event():
    cap = AnswerCapture("chat", stream=True)
    raw = b"".join(translated_stream(["Hel", "lo", " world"]))
    for i in range(0, len(raw), 7):  # arbitrary splits
        cap.feed(raw[i:i + 7])
    answer = cap.result()
    assert (answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens) == \
        ("Hello world", "stop", 3, 3)
    assert answer.id == "chatcmpl-1" and answer.created == 7 and answer.model == "llm-small"


def test_capture_json_answer_and_completions():
    body = oai.dumps(oai.chat_completion(id="c1", model="m", created=1, text="Paris", finish_reason="length",
                                         usage=oai.Usage(4, 1)))
    cap = AnswerCapture("chat", stream=False)
    cap.feed(body)
    assert cap.result().text == "Paris" and cap.result().finish_reason == "length"
    body = oai.dumps(oai.text_completion(id="c2", model="m", created=1, text="once", finish_reason="stop",
                                         usage=oai.Usage(1, 1)))
    cap = AnswerCapture("completions", stream=False)
    cap.feed(body)
    assert cap.result().text == "once"


@pytest.mark.parametrize("chunks,reason", [
    ([encode_event({"error": {"message": "boom"}}), b"data: [DONE]\n\n"], "error event"),
    ([encode_event({"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [{"id": "t"}]}}]})], "tool calls"),
    ([encode_event({"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}},
                                           {"index": 1, "delta": {"content": "b"}}]})], "several choices"),
    ([encode_event({"id": "x", "choices": [{"index": 0, "delta": {"content": "cut"}, "finish_reason": None}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1}})], "incomplete (no finish reason)"),
    ([b"data: " + b"x" * 100 + b"\n\n"], "too large"),
])
def test_uncacheable_streams_say_why(chunks, reason):
    cap = AnswerCapture("chat", stream=True, max_bytes=90 if reason == "too large" else 4096)
    for c in chunks:
        cap.feed(c)
    assert cap.result(oai.Usage(1, 1)) is None
    assert cap.reason == reason


def test_error_json_body_is_not_captured():
    cap = AnswerCapture("chat", stream=False)
    cap.feed(oai.upstream_error(503, "down").to_json())
    assert cap.result(oai.Usage(1, 1)) is None and cap.reason == "error body"


def test_serialisation_round_trip_and_corruption():
    a = CachedAnswer("chat", "m", "t\u00e9xt", "stop", 1, 2, "id", 3, 4.5, "q", "h", "small")
    assert CachedAnswer.from_bytes(a.to_bytes()) == a
    for bad in (b"not json", b"{}", b'{"f": 1, "nope": 1}', b'[1]'):
        with pytest.raises(ValueError):
            CachedAnswer.from_bytes(bad)


ANSWER = CachedAnswer("chat", "llm-small", "Hello world", "stop", 5, 2, "chatcmpl-orig", 100, 0.0)


def test_render_json_fresh_id_and_replayed_id():
    body, ctype = render(ANSWER, stream=False)
    obj = json.loads(body)
    assert ctype == "application/json" and obj["object"] == "chat.completion"
    assert obj["choices"][0]["message"]["content"] == "Hello world" and obj["id"] != "chatcmpl-orig"
    assert obj["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    replay = json.loads(render(ANSWER, stream=False, completion_id="chatcmpl-orig", created=100)[0])
    assert replay["id"] == "chatcmpl-orig" and replay["created"] == 100


def test_render_sse_is_a_proper_chat_stream():
    body, ctype = render(ANSWER, stream=True, include_usage=True, prompt_tokens=9)
    assert ctype == "text/event-stream"
    events = [e.data for e in SSEParser().feed(body)]
    assert events[-1] == "[DONE]" and body.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello world"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 9
    # what the gateway's own stream capture makes of the replay: the same answer
    cap = AnswerCapture("chat", stream=True)
    cap.feed(body)
    again = cap.result()
    assert (again.text, again.finish_reason, again.completion_tokens) == ("Hello world", "stop", 2)


def test_render_completions_stream():
    a = CachedAnswer("completions", "m", "abc", "length", 1, 1)
    events = [e.data for e in SSEParser().feed(render(a, stream=True)[0])]
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == ["text_completion", "text_completion"]
    assert chunks[0]["choices"][0]["text"] == "abc" and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_serve_records_savings_and_headers():
    from extproc.framework.config import TierConfig

    ctx = RequestContext("r", "POST", "/v1/chat/completions", {})
    ctx.request = chat_req(stream=True)
    ctx.tier = "small"
    ctx.tier_config = TierConfig(model="llm-small", price={"prompt_per_1k": 1.0, "completion_per_1k": 2.0})
    reply = serve(ctx, CachedAnswer("chat", "m", "x", "stop", 100, 50, stored_at=1.0), status="semantic_hit",
                  layer="semantic", similarity=0.93456, prompt_tokens=80)
    assert reply.status == 200 and ("content-type", "text/event-stream") in reply.headers
    assert ctx.cache_status == "semantic_hit" and ctx.cache_lookups == [("semantic", "hit")]
    assert ctx.tokens_saved == 130 and ctx.cost_saved_usd == pytest.approx((80 * 1.0 + 50 * 2.0) / 1000)
    assert ctx.cost_usd == 0.0
    assert ctx.response_headers["x-extproc-cache"] == "semantic_hit"
    assert ctx.response_headers["x-extproc-cache-similarity"] == "0.9346"
    assert int(ctx.response_headers["age"]) > 0


def test_shared_capture_parses_each_chunk_once_for_every_policy():
    """Four storing policies on one request share one capture: each chunk is parsed once."""
    from extproc_plugins.caching.cached_answer import feed_shared_capture, shared_capture
    from extproc.framework.context import RequestContext, ResponseChunk
    from extproc.formats.openai import Usage

    ctx = RequestContext("r", "POST", "/v1/chat/completions", {}, endpoint="chat")
    first = shared_capture(ctx, 1000)
    assert shared_capture(ctx, 5000) is first and first.max_bytes == 5000
    body = (b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
            b'"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}')
    chunk = ResponseChunk("hello", body, 1)
    for _ in range(4):  # every policy's extproc_response_chunk feeds it
        feed_shared_capture(ctx, chunk)
    assert first.size == len(body)
    a, b = first.result(Usage(2, 1)), first.result(Usage(2, 1))
    assert a.text == "hello" and a == b and a is not b  # one parse, a copy per caller
    assert first.result(Usage(2, 1), max_bytes=10) is None  # too large for this caller
