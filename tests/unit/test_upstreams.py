"""extproc.upstreams: one translator per upstream kind, picked by the tier's kind from the registry."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from extproc.formats.openai import parse_request
from extproc.framework.config import ConfigError, TierConfig, default_config_text, parse_config
from extproc.framework.testing import GatewayHarness, triton_answer
from extproc.upstreams import registry
from extproc.upstreams.base import Translated, UpstreamRequest, WholeBody, error_response
from extproc.upstreams.openai import OpenAIUpstream
from extproc.upstreams.triton import TritonUpstream


def ctx_for(tier: TierConfig, body: dict, endpoint: str = "chat", path: str = "/v1/chat/completions"):
    """The parts of a RequestContext a translator reads."""
    return SimpleNamespace(endpoint=endpoint, path=path, tier_config=tier,
                           request=parse_request(endpoint, json.dumps(body).encode()))


CHAT = {"model": "small", "messages": [{"role": "user", "content": "hi"}]}


# ------------------------------------------------------------------ the registry and the config


def test_the_registry_knows_triton_and_openai():
    assert registry.known_kinds() == ["openai", "triton"]
    assert isinstance(registry.upstream_for(TierConfig(model="m")), TritonUpstream)
    assert isinstance(registry.upstream_for(TierConfig(model="m", kind="openai")), OpenAIUpstream)
    assert registry.kinds_taking_api_keys() == ["openai"]


def test_an_unknown_kind_is_a_config_error_naming_the_known_ones():
    cfg = yaml.safe_load(default_config_text())
    cfg["tiers"]["small"]["kind"] = "grpc"
    with pytest.raises(ConfigError, match=r"tiers\.small\.kind: .*unknown upstream kind 'grpc' \(known: openai, triton\)"):
        parse_config(cfg)


def test_default_max_tokens_is_the_tiers_for_triton_and_the_upstreams_for_openai():
    assert TritonUpstream().default_max_tokens(TierConfig(model="m", default_max_tokens=77)) == 77
    assert OpenAIUpstream().default_max_tokens(TierConfig(model="m", kind="openai", default_max_tokens=77)) is None


def test_auth_headers():
    assert TritonUpstream().auth_headers("small", TierConfig(model="m")) == ([], ["authorization"])
    assert OpenAIUpstream().auth_headers("h", TierConfig(model="m", kind="openai", forward_authorization=True)) == ([], [])


# ------------------------------------------------------------------ triton


def test_triton_request_renders_the_chat_and_rewrites_path_and_body():
    tier = TierConfig(model="llm-small", default_max_tokens=32)
    call = TritonUpstream().request(ctx_for(tier, {**CHAT, "stream": True}))
    assert call.upstream.path == "/v2/models/llm-small/generate_stream"
    body = json.loads(call.upstream.body)
    assert body["text_input"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert body["max_tokens"] == 32 and body["stream"] is True


def test_triton_is_always_asked_to_stream_so_a_silent_model_is_an_idle_upstream():
    call = TritonUpstream().request(ctx_for(TierConfig(model="llm-small"), CHAT))  # the client did not ask to stream
    assert call.upstream.path == "/v2/models/llm-small/generate_stream"
    assert json.loads(call.upstream.body)["stream"] is True


def test_triton_events_for_a_non_streaming_client_are_held_back_then_gathered_with_usage():
    tier = TierConfig(model="llm-small")
    call = TritonUpstream().request(ctx_for(tier, CHAT))
    set_h, remove, translator = call.response(200, False)
    assert set_h == [("content-type", "application/json")] and remove == ["content-length"]
    whole = b"".join(triton_answer("Hello there", prompt_tokens=4))
    first = translator.translate(whole[:10], False)
    assert first == Translated(body=b"")  # held back until the end
    last = translator.translate(whole[10:], True)
    assert last.complete and last.error is None and last.body == last.sent
    answer = json.loads(last.body)
    assert answer["choices"][0]["message"]["content"] == "Hello there"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 2)


def test_triton_stream_events_split_across_chunks_complete_at_done():
    tier = TierConfig(model="llm-small")
    call = TritonUpstream().request(ctx_for(tier, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}))
    set_h, remove, translator = call.response(200, True)
    assert ("content-type", "text/event-stream") in set_h
    raw = b"".join(triton_answer("one two three"))
    pieces = [raw[i:i + 7] for i in range(0, len(raw), 7)]
    results = [translator.translate(p, False) for p in pieces]
    text = "".join(r.text for r in results)
    assert text == "one two three"
    assert results[-1].complete and results[-1].usage.completion_tokens == 3  # [DONE] went out
    assert b"data: [DONE]" in b"".join(r.sent for r in results)
    assert not any(r.complete for r in results[:-1])


def test_an_error_event_for_a_non_streaming_client_is_an_error_status_not_a_200():
    call = TritonUpstream().request(ctx_for(TierConfig(model="m"), CHAT))
    _, _, translator = call.response(200, False)
    assert translator.whole  # Envoy holds the headers for the whole body: the status can still change
    result = translator.translate(b'data: {"text_output": "par"}\n\ndata: {"error": "model crashed"}\n\n', True)
    assert result.complete and result.status == 502 and "model crashed" in json.loads(result.body)["error"]["message"]
    streamed = TritonUpstream().request(ctx_for(TierConfig(model="m"), {**CHAT, "stream": True})).response(200, True)[2]
    assert not getattr(streamed, "whole", False)  # a stream goes out as it comes


def test_triton_bad_answer_is_an_openai_error():
    call = TritonUpstream().request(ctx_for(TierConfig(model="m"), CHAT))
    _, _, translator = call.response(200, False)
    result = translator.translate(b"not json", True)
    assert result.complete and result.usage is None and result.error == result.body
    assert "error" in json.loads(result.body)


# ------------------------------------------------------------------ openai


def test_openai_request_passes_through_with_the_model_renamed():
    tier = TierConfig(model="gpt-4o-mini", kind="openai")
    call = OpenAIUpstream().request(ctx_for(tier, {**CHAT, "temperature": 0.5}))
    assert call.upstream.path == "/v1/chat/completions"
    body = json.loads(call.upstream.body)
    assert body["model"] == "gpt-4o-mini" and body["temperature"] == 0.5


def test_openai_json_passes_unchanged_and_reports_usage():
    call = OpenAIUpstream().request(ctx_for(TierConfig(model="g", kind="openai"), CHAT))
    set_h, remove, translator = call.response(200, False)
    assert (set_h, remove) == ([], [])
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}}).encode()
    assert translator.translate(body[:5], False) == Translated()  # sent on as it comes
    result = translator.translate(body[5:], True)
    assert result.body is None and result.complete and result.usage.completion_tokens == 5


def test_openai_stream_reports_usage_and_completes_at_done():
    call = OpenAIUpstream().request(ctx_for(TierConfig(model="g", kind="openai"), {**CHAT, "stream": True}))
    _, _, translator = call.response(200, True)
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n'
    first = translator.translate(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n' + usage[:20], False)
    assert first.body is None and not first.complete and first.usage is None
    second = translator.translate(usage[20:], False)
    assert second.usage.completion_tokens == 2 and not second.complete
    done = translator.translate(b"data: [DONE]\n\n", False)
    assert done.complete and done.usage.completion_tokens == 2


def test_an_error_status_is_any_kinds_openai_error():
    set_h, remove, translator = error_response(503)
    assert set_h == [("content-type", "application/json")] and remove == ["content-length"]
    assert translator.translate(b"upstream connect", False) == Translated(body=b"")
    result = translator.translate(b" error", True)
    assert result.complete and result.error == result.body and json.loads(result.body)["error"]
    already = b'{"error": {"message": "slow down", "type": "rate_limit"}}'
    _, _, translator = error_response(429)
    assert translator.translate(already, True).body == already


# ------------------------------------------------------------------ a third kind, without touching the lifecycle


class EchoUpstream:
    """A made-up kind: answers with the request's last message, reversed, as plain JSON."""

    kind = "echo"
    takes_api_key = False
    exports_triton_metrics = False

    def default_max_tokens(self, tier):
        return None

    def auth_headers(self, name, tier):
        return [], ["authorization"]

    def request(self, ctx):
        return EchoCall(ctx)


class EchoCall:
    def __init__(self, ctx):
        self.upstream = UpstreamRequest("/echo", ctx.request.messages[-1].text.encode())

    def response(self, status, stream):
        def whole(body: bytes) -> Translated:
            out = json.dumps({"echo": body.decode()[::-1]}).encode()
            return Translated(body=out, sent=out, complete=True)

        return [("content-type", "application/json")], ["content-length"], WholeBody(whole, hold_back=True)


async def test_a_new_kind_is_a_registry_line(monkeypatch):
    monkeypatch.setitem(registry.UPSTREAMS, "echo", EchoUpstream())
    cfg = yaml.safe_load(default_config_text())
    cfg["tiers"]["echoes"] = {"model": "echo-1", "kind": "echo"}
    cfg["plugins"] = [{"name": "model_tiers"}]
    async with GatewayHarness(config=cfg) as gw:
        result = await gw.chat("hello", model="echoes", upstream_chunks=[b"hel", b"lo"])
    assert result.upstream_path == "/echo" and result.upstream_body == b"hello"
    assert result.status == 200 and result.json() == {"echo": "olleh"}
    assert result.ctx.outcome == "completed"


def test_which_tiers_export_triton_metrics_is_the_kinds_answer():
    assert registry.exports_triton_metrics(TierConfig(model="m", kind="triton"))
    assert not registry.exports_triton_metrics(TierConfig(model="m", kind="openai"))


async def test_a_pinned_triton_tier_enforces_its_context_window():
    from extproc.framework.testing import GatewayHarness

    async with GatewayHarness() as gw:  # the embedded default with model_tiers only
        too_long = await gw.chat("word " * 3000, model="small")  # small: 2,048 tokens
        answer_too_long = await gw.chat("word " * 1000, model="small", max_tokens=1500)
        fits = await gw.chat("word " * 1000, model="small", max_tokens=64)
    assert too_long.status == 400 and too_long.upstream_path is None  # never sent
    err = too_long.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages" and err["type"] == "invalid_request_error"
    assert "2048" in err["message"]
    assert answer_too_long.status == 400
    assert fits.upstream_path is not None
