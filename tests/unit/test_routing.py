"""The routing policies' shared helpers: ladder, route text, capabilities, one batched embedding per request."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from extproc_plugins.routing import ladder as routing
from extproc.embeddings import prompt as prompts
from extproc.framework.config import load_config
from extproc.framework.context import RequestContext
from extproc.formats.openai import parse_request


def ctx_for(body: dict, endpoint: str = "chat") -> RequestContext:
    import json

    ctx = RequestContext("r", "POST", "/v1/chat/completions", {})
    ctx.endpoint = endpoint
    ctx.request = parse_request(endpoint, json.dumps(body).encode())
    return ctx


def chat(content, **extra) -> RequestContext:
    return ctx_for({"model": "auto", "messages": [{"role": "user", "content": content}], **extra})


# ---------------------------------------------------------------------------- the ladder


def test_ladder_is_cheapest_first_by_price_with_ties_in_config_order():
    tiers = load_config(None).tiers
    assert routing.tier_ladder(tiers) == ["small", "medium", "large"]
    reordered = {"large": tiers["large"], "small": tiers["small"], "medium": tiers["medium"]}
    assert routing.tier_ladder(reordered) == ["small", "medium", "large"]
    same = {"b": tiers["small"], "a": tiers["small"]}
    assert routing.tier_ladder(same) == ["b", "a"]


def test_explicit_ladder_is_checked():
    tiers = load_config(None).tiers
    assert routing.tier_ladder(tiers, ["large", "small"]) == ["large", "small"]
    with pytest.raises(ValueError, match="unknown tier.*'huge'"):
        routing.tier_ladder(tiers, ["small", "huge"])
    with pytest.raises(ValueError, match="twice"):
        routing.tier_ladder(tiers, ["small", "small"])


@pytest.mark.parametrize("tier,candidates,prefer,expected", [
    ("large", ["small", "medium", "large"], "up", "large"),
    ("large", ["small", "medium"], "up", "medium"),
    ("medium", ["small", "large"], "up", "large"),      # a tie, quality first
    ("medium", ["small", "large"], "down", "small"),    # a tie: cost first
    ("small", ["large"], "up", "large"),
    ("small", [], "up", None),
    ("unknown", ["small"], "up", None),
])
def test_closest_allowed(tier, candidates, prefer, expected):
    assert routing.closest_allowed(tier, candidates, ["small", "medium", "large"], prefer=prefer) == expected


@pytest.mark.parametrize("tier,candidates,steps,floor,expected", [
    ("large", ["small", "medium", "large"], 1, None, "medium"),
    ("large", ["small", "large"], 1, None, "small"),       # medium not allowed: skipped
    ("large", ["small", "medium", "large"], 2, None, "small"),
    ("large", ["small", "medium", "large"], 5, None, "small"),
    ("medium", ["small", "medium", "large"], 1, "medium", "medium"),  # the floor holds
    ("small", ["small", "medium", "large"], 1, None, "small"),        # nothing cheaper
    ("large", ["large"], 1, None, "large"),
])
def test_step_down(tier, candidates, steps, floor, expected):
    assert routing.step_down(tier, candidates, ["small", "medium", "large"], steps, floor) == expected


# ---------------------------------------------------------------------------- the request


def test_route_text_is_the_last_user_message_clipped():
    ctx = ctx_for({"model": "auto", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "  second question  "}]})
    assert prompts.route_text(ctx) == "second question"
    long = chat("x" * 50_000)
    assert len(prompts.route_text(long)) == prompts.ROUTE_TEXT_CHARS
    completion = ctx_for({"model": "auto", "prompt": "complete me"}, endpoint="completions")
    assert prompts.route_text(completion) == "complete me"


def test_prompt_tokens_counts_the_whole_chat_once():
    ctx = ctx_for({"model": "auto", "messages": [{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": "hello there"}]})
    n = prompts.prompt_tokens(ctx)
    assert n > 4 and ctx.prompt_tokens_estimate == n
    ctx.prompt_tokens_estimate = 999  # set by another policy: reused, not recounted
    assert prompts.prompt_tokens(ctx) == 999


def test_required_capabilities():
    tool = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert routing.required_capabilities(chat("hi")) == set()
    assert routing.required_capabilities(chat("hi", tools=tool)) == {"tools"}
    assert routing.required_capabilities(chat("hi", tools=tool, tool_choice="none")) == {"tools"}
    assert routing.required_capabilities(chat("hi", response_format={"type": "json_object"})) == {"json_mode"}
    assert routing.required_capabilities(chat("hi", response_format={"type": "text"})) == set()
    image = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:x"}}]
    assert routing.required_capabilities(chat(image)) == {"vision"}


def test_trace_format():
    ctx = chat("hi")
    routing.trace(ctx, "my_policy", "did a thing")
    assert ctx.route_trace == ["my_policy: did a thing"]


# ---------------------------------------------------------------------------- embeddings


class CountingEncoder:
    """A deterministic stand-in for MiniLM that records how it was called."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[list[str]] = []
        self.delay = delay

    def encode(self, texts):
        import time

        self.calls.append(list(texts))
        time.sleep(self.delay)
        out = np.zeros((len(texts), 384), np.float32)
        for i, t in enumerate(texts):
            out[i, hash(t) % 384] = 1.0
        return out


async def test_concurrent_asks_are_batched_and_each_gets_its_own_vector():
    enc = CountingEncoder(delay=0.05)
    embedder = prompts.PromptEmbedder(lambda: enc)
    texts = [f"text {i}" for i in range(16)]
    vectors = await asyncio.gather(*(embedder.batcher.encode(t) for t in texts))
    assert len(enc.calls) < 16  # one single call first, then the rest together
    assert sum(len(c) for c in enc.calls) == 16
    for t, v in zip(texts, vectors):
        assert v[hash(t) % 384] == 1.0


async def test_batcher_never_exceeds_max_batch():
    enc = CountingEncoder(delay=0.02)
    batcher = prompts.EmbeddingBatcher(enc.encode, max_batch=4)
    await asyncio.gather(*(batcher.encode(str(i)) for i in range(10)))
    assert max(len(c) for c in enc.calls) <= 4 and sum(len(c) for c in enc.calls) == 10


async def test_encoder_failure_reaches_every_waiter_and_the_batcher_recovers():
    class Failing:
        fail = True

        def encode(self, texts):
            if self.fail:
                raise RuntimeError("encoder broke")
            return np.ones((len(texts), 384), np.float32)

    enc = Failing()
    batcher = prompts.EmbeddingBatcher(enc.encode)
    results = await asyncio.gather(*(batcher.encode(str(i)) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    enc.fail = False
    assert (await batcher.encode("again")).shape == (384,)


async def test_a_cancelled_waiter_does_not_break_the_others():
    enc = CountingEncoder(delay=0.05)
    batcher = prompts.EmbeddingBatcher(enc.encode)
    first = asyncio.ensure_future(batcher.encode("a"))
    second = asyncio.ensure_future(batcher.encode("b"))
    third = asyncio.ensure_future(batcher.encode("c"))
    await asyncio.sleep(0)
    second.cancel()
    assert (await first).shape == (384,) and (await third).shape == (384,)
    assert second.cancelled()


def test_embedding_cache_is_bounded_lru():
    cache = prompts.EmbeddingCache(max_entries=3)
    for i in range(3):
        cache.put(str(i), np.full(2, i, np.float32))
    assert cache.get("0") is not None  # 0 is now the most recent
    cache.put("3", np.zeros(2, np.float32))
    assert len(cache) == 3 and cache.get("1") is None and cache.get("0") is not None


async def test_prompt_embedding_is_computed_once_per_request_and_cached_across_requests():
    enc = CountingEncoder()
    embedder = prompts.PromptEmbedder(lambda: enc)
    ctx = chat("route me")
    v1 = await prompts.prompt_embedding(ctx, embedder)
    v2 = await prompts.prompt_embedding(ctx, embedder)  # the second policy asking
    assert v1 is v2 and ctx.embedding_calls == 1 and len(enc.calls) == 1
    again = chat("route me")
    await prompts.prompt_embedding(again, embedder)  # same text, next request: the LRU answers
    assert again.embedding_calls == 0 and len(enc.calls) == 1


async def test_real_encoder_through_the_batcher_matches_a_direct_call():
    from extproc.embeddings.encoder import get_encoder

    embedder = prompts.PromptEmbedder()
    texts = ["Extract the email address", "Prove the theorem", "Write an email to my boss"]
    batched = await asyncio.gather(*(embedder.batcher.encode(t) for t in texts))
    direct = get_encoder().encode(texts)
    assert np.allclose(np.stack(batched), direct, atol=1e-5)


def test_closest_allowed_prefers_the_cheaper_neighbour_by_default():
    # a tier removed for cost or permission must not turn into a dearer one
    assert routing.closest_allowed("large", ["small", "medium", "passthrough"],
                                   ["small", "medium", "large", "passthrough"]) == "medium"


async def test_large_prompts_are_counted_off_the_event_loop_with_the_same_result():
    import threading

    big = chat("The quick brown fox jumps over the lazy dog. " * 3000)  # ~135 KB
    small = chat("The quick brown fox jumps over the lazy dog. " * 3000)
    seen = []
    original = prompts._count

    def spy(ctx, encoding):
        seen.append(threading.current_thread() is threading.main_thread())
        return original(ctx, encoding)

    prompts._count = spy
    try:
        n = await prompts.prompt_tokens_async(big)
    finally:
        prompts._count = original
    assert seen == [False] and n == prompts.prompt_tokens(small) > 27_000
    short = chat("hello")
    assert await prompts.prompt_tokens_async(short) == prompts.prompt_tokens(chat("hello"))
