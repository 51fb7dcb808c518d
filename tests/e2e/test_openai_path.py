"""The spine, end to end: the official openai client -> Envoy -> ext_proc -> Triton -> back."""

from __future__ import annotations

import json

import pytest

from .conftest import STUB_UPSTREAM_KEY

pytestmark = pytest.mark.e2e


def test_chat_completion_comes_back_from_triton_with_usage(client):
    reply = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8)
    assert reply.object == "chat.completion"
    assert reply.model == "llm-small"  # the Triton model that answered
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_completion_arrives_chunk_by_chunk_with_usage(client):
    stream = client.chat.completions.create(
        model="large", messages=[{"role": "user", "content": "Count to five"}], max_tokens=6, stream=True)
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 2  # token by token, not one blob
    assert {c.model for c in chunks} == {"llm-large"}
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].usage.completion_tokens == 6
    assert final[0].choices[0].finish_reason == "length"


def test_greedy_answers_are_deterministic(client):
    def ask():
        return client.chat.completions.create(
            model="medium", messages=[{"role": "user", "content": "Same prompt"}], max_tokens=6,
            temperature=0).choices[0].message.content

    assert ask() == ask()


def test_stream_and_non_stream_give_the_same_greedy_text(client):
    args = dict(model="small", messages=[{"role": "user", "content": "Compare"}], max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)
                       if c.choices)
    assert streamed == whole


def test_text_completions_plain_and_streamed(client):
    reply = client.completions.create(model="small", prompt="Once upon a time", max_tokens=5)
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage.completion_tokens <= 5
    chunks = list(client.completions.create(model="small", prompt="Once upon a time", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text


def test_stream_ends_with_done_exactly_once(http):
    body = {"model": "small", "stream": True, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.count("data: [DONE]") == 1 and r.text.rstrip().endswith("data: [DONE]")


def test_response_headers_explain_the_tier(http):
    r = http.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "hi"}]})
    assert r.headers["x-extproc-tier"] == "small"
    assert r.headers["x-extproc-tier-reason"] == "default"
    assert r.headers["x-extproc-request-id"]


def test_models_are_listed(client):
    ids = {m.id for m in client.models.list()}
    assert {"auto", "small", "medium", "large", "llm-small", "stub"} <= ids


def test_openai_passthrough_tier_gets_the_request_unchanged_but_the_model(client):
    raw = client.chat.completions.with_raw_response.create(
        model="stub", messages=[{"role": "user", "content": "hi"}], max_tokens=3, user="alice")
    reply = raw.parse()
    assert reply.usage.total_tokens > 0
    assert reply.model == "stub-model"  # the stub answers with the model it was sent
    seen = json.loads(raw.http_response.text)["stub_request"]
    assert seen["path"] == "/v1/chat/completions"
    assert not any(h.startswith("x-extproc-") for h in seen["headers"])  # not leaked upstream
    # The tier's own key (api_key_env) replaced the client's gateway credentials.
    assert seen["headers"]["authorization"] == f"Bearer {STUB_UPSTREAM_KEY}"
    assert raw.http_response.headers["x-extproc-tier"] == "passthrough"


def test_openai_passthrough_stream_is_relayed(client):
    chunks = list(client.chat.completions.create(
        model="stub", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_a_one_megabyte_body_goes_through_envoy_and_the_service(client):
    big = "x" * (1024 * 1024)
    raw = client.chat.completions.with_raw_response.create(
        model="stub", messages=[{"role": "user", "content": big}], max_tokens=3)
    assert raw.http_response.status_code == 200
    seen = json.loads(raw.http_response.text)["stub_request"]
    assert seen["body_bytes"] > 1024 * 1024  # the upstream received all of it


def test_client_cannot_pick_the_tier_with_internal_headers(http):
    r = http.post("/v1/chat/completions", headers={"x-extproc-tier": "large"},
                  json={"model": "small", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["model"] == "llm-small"
