"""The exact cache through the real lifecycle (GatewayHarness): hits, replays, controls, scoping, failures."""

from __future__ import annotations

import asyncio
import json

import pytest

from extproc.state.memory import MemoryStore
from extproc.state.store import StoreUnavailable
from extproc_plugins.caching.exact_cache import ExactCache

from .cache_helpers import TenantFromHeader, chat_body, content, harness, plugin_of


async def test_repeat_is_served_from_the_cache_without_going_upstream():
    async with harness(ExactCache) as gw:
        first = await gw.send(chat_body("What is 2+2?"), answer="four it is")
        again = await gw.send(chat_body("What  is 2+2? "), answer="SHOULD NOT BE SEEN")
    assert not first.replied and first.headers["x-extproc-cache"] == "miss"
    assert again.replied and again.status == 200
    assert content(again) == "four it is"
    assert again.headers["x-extproc-cache"] == "hit" and again.headers["age"] == "0"
    assert again.headers["content-type"] == "application/json"
    ctx = again.ctx
    assert ctx.cache_status == "hit" and ctx.cache_lookups == [("exact", "hit")]
    assert ctx.tokens_saved == first.ctx.usage.total_tokens and ctx.cost_saved_usd > 0 and ctx.cost_usd == 0.0
    assert again.json()["usage"] == first.json()["usage"] and again.json()["id"] != first.json()["id"]


@pytest.mark.parametrize("first_stream,second_stream", [(False, True), (True, False), (True, True)])
async def test_streamed_requests_are_replayed_as_sse_and_json_both_ways(first_stream, second_stream):
    async with harness(ExactCache) as gw:
        await gw.send(chat_body("hi", stream=first_stream), answer="one two three")
        hit = await gw.send(chat_body("hi", stream=second_stream, stream_options={"include_usage": True}
                                      if second_stream else None) if second_stream else chat_body("hi"))
    assert hit.replied and content(hit) == "one two three"
    if second_stream:
        assert hit.headers["content-type"] == "text/event-stream"
        events = hit.events()
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"] == [] and json.loads(events[-2])["usage"]["completion_tokens"] == 3


async def test_non_deterministic_requests_are_neither_served_nor_stored():
    async with harness(ExactCache) as gw:
        for temperature in (0.7, None):
            a = await gw.send(chat_body("hi", temperature=temperature))
            b = await gw.send(chat_body("hi", temperature=temperature))
            assert not a.replied and not b.replied
            assert b.ctx.cache_lookups == [("exact", "skip")] and b.ctx.cache_status is None
    async with harness(ExactCache, {"max_temperature": 1.0}) as gw:  # configured otherwise
        await gw.send(chat_body("hi", temperature=0.7))
        assert (await gw.send(chat_body("hi", temperature=0.7))).replied


async def test_tenant_a_never_gets_tenant_b_answer():
    from extproc.framework.testing import GatewayHarness

    from .cache_helpers import config

    async with GatewayHarness(ExactCache, TenantFromHeader, config=config()) as gw:
        a = await gw.send(chat_body("secret plan?"), headers={"x-test-tenant": "A"}, answer="A's answer")
        b = await gw.send(chat_body("secret plan?"), headers={"x-test-tenant": "B"}, answer="B's answer")
        a2 = await gw.send(chat_body("secret plan?"), headers={"x-test-tenant": "A"})
    assert not b.replied and content(b) == "B's answer"
    assert a2.replied and content(a2) == "A's answer"


async def test_cache_control_no_cache_goes_upstream_and_refreshes_the_entry():
    async with harness(ExactCache) as gw:
        await gw.send(chat_body("q"), answer="old")
        fresh = await gw.send(chat_body("q"), answer="new", headers={"cache-control": "no-cache"})
        after = await gw.send(chat_body("q"))
    assert not fresh.replied and fresh.headers["x-extproc-cache"] == "bypass"
    assert fresh.ctx.cache_lookups == [("exact", "bypass")]
    assert after.replied and content(after) == "new"


async def test_cache_control_no_store_is_not_stored_but_may_be_served():
    async with harness(ExactCache) as gw:
        await gw.send(chat_body("q"), answer="x", headers={"cache-control": "no-store"})
        assert not (await gw.send(chat_body("q"), answer="y")).replied  # nothing was stored
        served = await gw.send(chat_body("q"), headers={"cache-control": "no-store"})
    assert served.replied and content(served) == "y"


async def test_max_age_and_per_request_ttl():
    async with harness(ExactCache) as gw:
        await gw.send(chat_body("q"), answer="x", headers={"x-cache-ttl": "0.2"})
        await asyncio.sleep(0.05)
        stale = await gw.send(chat_body("q"), headers={"cache-control": "max-age=0.01"}, answer="y")
        assert not stale.replied and ("exact", "stale") in stale.ctx.cache_lookups
        await asyncio.sleep(0.3)  # the per-request TTL (0.2 s) is over
        assert not (await gw.send(chat_body("q2"), headers={"x-cache-ttl": "0"})).replied
        assert not (await gw.send(chat_body("q2"))).replied  # ttl 0: not stored


async def test_bad_cache_headers_get_openai_400():
    async with harness(ExactCache) as gw:
        ttl = await gw.send(chat_body("q"), headers={"x-cache-ttl": "tomorrow"})
        cc = await gw.send(chat_body("q"), headers={"cache-control": "max-age=-1"})
    assert ttl.status == 400 and ttl.json()["error"]["code"] == "invalid_cache_ttl"
    assert ttl.json()["error"]["type"] == "invalid_request_error"
    assert cc.status == 400 and cc.json()["error"]["code"] == "invalid_cache_control"


async def test_errors_and_aborted_answers_are_never_stored_truncated_length_is():
    async with harness(ExactCache) as gw:
        err = await gw.send(chat_body("q"), upstream_status=503, upstream_chunks=[b'{"error": "busy"}'])
        assert err.status == 503 and err.json()["error"]["code"] == "upstream_unavailable"
        assert not (await gw.send(chat_body("q"), answer="ok")).replied  # the error was not stored
        aborted = await gw.send(chat_body("a", stream=True), answer="one two three four", abort_after_chunks=2)
        assert aborted.ctx.outcome == "aborted"
        assert not (await gw.send(chat_body("a", stream=True))).replied
        length = json.dumps({"text_output": "cut", "prompt_tokens": 1, "completion_tokens": 16,
                             "finish_reason": "length"}).encode()
        await gw.send(chat_body("l", max_tokens=16), upstream_chunks=[b"data: " + length + b"\n\n"])
        hit = await gw.send(chat_body("l", max_tokens=16))
        other_limit = await gw.send(chat_body("l", max_tokens=17))
    assert hit.replied and hit.json()["choices"][0]["finish_reason"] == "length"
    assert not other_limit.replied  # max_tokens is in the key


async def test_error_event_in_a_stream_is_not_stored():
    async with harness(ExactCache) as gw:
        chunks = [b'data: {"text_output": "par", "finish_reason": ""}\n\n', b'data: {"error": "model crashed"}\n\n']
        bad = await gw.send(chat_body("s", stream=True), upstream_chunks=chunks)
        assert bad.ctx.outcome == "failed"
        assert not (await gw.send(chat_body("s", stream=True))).replied


async def test_redis_down_degrades_to_no_cache_without_failing_requests():
    async with harness(ExactCache, redis_url="redis://127.0.0.1:1/0") as gw:
        first = await gw.send(chat_body("q"), answer="fine")
        second = await gw.send(chat_body("q"), answer="fine again")
    assert first.status == second.status == 200 and content(second) == "fine again"
    assert first.ctx.cache_lookups == [("exact", "error")]
    assert second.ctx.cache_lookups == [("exact", "unavailable")]  # the breaker: no new attempt for a while


async def test_breaker_retries_after_its_cooldown_and_closes(monkeypatch):
    async with harness(ExactCache, {"store_retry_seconds": 0.05}) as gw:
        cache = plugin_of(gw, "ExactCache")
        real = cache.store

        class Down:
            async def get(self, key):
                raise StoreUnavailable("down")

            async def set(self, *a, **k):
                raise StoreUnavailable("down")

        cache.store = Down()
        assert (await gw.send(chat_body("q"))).ctx.cache_lookups == [("exact", "error")]
        cache.store = real
        await asyncio.sleep(0.06)
        await gw.send(chat_body("q"), answer="back")
        assert (await gw.send(chat_body("q"))).replied


async def test_two_gateways_share_entries_through_redis(redis_url):
    async with harness(ExactCache, redis_url=redis_url, prefix="shared-exact:") as one, \
            harness(ExactCache, redis_url=redis_url, prefix="shared-exact:") as two:
        await one.send(chat_body("shared?"), answer="from one")
        hit = await two.send(chat_body("shared?"))
    assert hit.replied and content(hit) == "from one"


async def test_memory_store_is_bounded_under_sustained_load():
    async with harness(ExactCache, {"memory_max_bytes": 20_000}) as gw:
        for i in range(200):
            await gw.send(chat_body(f"question {i}"), answer="an answer " * 5)
        store = plugin_of(gw, "ExactCache").store
    assert isinstance(store, MemoryStore) and store.used_bytes <= 20_000
    assert store is not gw.gateway.store  # its own bound: cache pressure never evicts other policies' state


async def test_corrupt_entry_is_a_miss_and_is_overwritten():
    async with harness(ExactCache) as gw:
        await gw.send(chat_body("q"), answer="x")
        cache = plugin_of(gw, "ExactCache")
        key = next(iter(cache.store._data))
        cache.store._data[key] = (b"garbage", None)
        miss = await gw.send(chat_body("q"), answer="y")
        hit = await gw.send(chat_body("q"))
    assert not miss.replied and content(hit) == "y"


class _Bug(Exception):
    pass


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
async def test_a_bug_in_the_cache_follows_its_failure_policy(on_error):
    async with harness(ExactCache, on_error=on_error) as gw:
        class Broken:
            async def get(self, key):
                raise _Bug("boom")

        plugin_of(gw, "ExactCache").store = Broken()
        result = await gw.send(chat_body("q"), answer="still answered")
    if on_error == "fail_closed":
        assert result.status == 500 and result.json()["error"]["code"] == "plugin_error"
    else:
        assert result.status == 200 and content(result) == "still answered"
        assert result.headers["x-extproc-degraded"] == "ExactCache"


async def test_near_cache_in_front_of_redis_is_short_lived(redis_url):
    settings = {"near_cache_seconds": 0.3}
    async with harness(ExactCache, settings, redis_url=redis_url, prefix="near:") as one, \
            harness(ExactCache, settings, redis_url=redis_url, prefix="near:") as two:
        await one.send(chat_body("q"), answer="old")
        assert content(await two.send(chat_body("q"))) == "old"  # now in two's near cache too
        await one.send(chat_body("q"), answer="new", headers={"cache-control": "no-cache"})  # refreshed in Redis
        assert content(await two.send(chat_body("q"))) == "old"  # two's near copy, for at most 0.3 s
        await asyncio.sleep(0.35)
        assert content(await two.send(chat_body("q"))) == "new"
        cache = plugin_of(two, "ExactCache")
        assert cache.near is not None and cache.near.used_bytes <= cache.settings.near_cache_max_bytes


async def test_completions_endpoint_is_cached_and_replayed():
    body = {"model": "auto", "prompt": "Once upon a time", "temperature": 0}
    async with harness(ExactCache) as gw:
        await gw.send(body, path="/v1/completions", answer="there was a cat")
        hit = await gw.send({**body, "prompt": "Once upon  a time "}, path="/v1/completions")
        streamed = await gw.send({**body, "stream": True}, path="/v1/completions")
    assert hit.replied and hit.json()["object"] == "text_completion" and content(hit) == "there was a cat"
    assert streamed.replied and content(streamed) == "there was a cat"
    assert json.loads(streamed.events()[0])["object"] == "text_completion"
