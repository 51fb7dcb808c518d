"""In-flight coalescing: identical concurrent requests share one upstream call, in a worker and across
workers through a real Redis; a failing, leaving or dead leader never strands its followers."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from extproc.wire.decisions import Continue, Reply
from extproc.framework.testing import triton_answer
from extproc_plugins.caching.coalescing import Coalescing

from .cache_helpers import chat_body, harness, plugin_of


async def start(gw, body: dict, headers: dict | None = None):
    """Play a request up to the upstream call: (lifecycle, decision)."""
    life = gw.gateway.new_stream()
    raw = json.dumps(body).encode()
    await life.request_headers({":method": "POST", ":path": "/v1/chat/completions",
                                "content-length": str(len(raw)), **(headers or {})}, False)
    return life, await life.request_body(raw, True)


async def finish(life, answer: str = "the shared answer", *, status: int = 200, stream: bool = False) -> None:
    """Play the upstream's answer and the end of the stream."""
    await life.response_headers({":status": str(status)}, False)
    chunks = triton_answer(answer) if status == 200 else [b'{"error": "busy"}']
    for i, chunk in enumerate(chunks):
        await life.response_body(chunk, i == len(chunks) - 1)
    await life.stream_closed(False)


def text_of(reply: Reply) -> str:
    if reply.body.startswith(b"data:"):
        out = ""
        for line in reply.body.split(b"\n"):
            if line.startswith(b"data: {"):
                for c in json.loads(line[6:]).get("choices", []):
                    out += (c.get("delta") or {}).get("content") or ""
        return out
    return json.loads(reply.body)["choices"][0]["message"]["content"]


async def followers(gw, n, body, **kw):
    tasks = [asyncio.create_task(start(gw, body, **kw)) for _ in range(n)]
    await asyncio.sleep(0.05)
    return tasks


async def test_n_identical_concurrent_requests_make_one_upstream_call():
    async with harness(Coalescing) as gw:
        leader, decision = await start(gw, chat_body("same question"))
        assert isinstance(decision, Continue)
        waiting = await followers(gw, 7, chat_body("same  question", stream=True))
        assert not any(t.done() for t in waiting)
        await finish(leader, "one answer for all")
        results = await asyncio.gather(*waiting)
        cache = plugin_of(gw, "Coalescing")
    assert all(isinstance(d, Reply) for _, d in results)  # nobody else went upstream
    for life, reply in results:
        assert text_of(reply) == "one answer for all" and reply.body.endswith(b"data: [DONE]\n\n")
        assert life.ctx.cache_status == "coalesced" and ("x-extproc-cache", "coalesced") in reply.headers
        assert life.ctx.tokens_saved > 0
        await life.stream_closed(False)
    assert leader.ctx.cache_lookups == [("coalescing", "leader")] and leader.ctx.cache_status == "miss"
    assert cache.in_flight == 0  # nothing left behind


@pytest.mark.parametrize("how", ["upstream_error", "client_left"])
async def test_failed_leader_hands_over_to_one_follower(how):
    async with harness(Coalescing) as gw:
        leader, _ = await start(gw, chat_body("q"))
        waiting = await followers(gw, 4, chat_body("q"))
        if how == "upstream_error":
            await finish(leader, status=503)
        else:
            await leader.stream_closed(True)  # the client went away before the answer
        await asyncio.sleep(0.05)
        done = [t for t in waiting if t.done()]
        assert len(done) == 1 and isinstance(done[0].result()[1], Continue)  # the new leader
        new_leader = done[0].result()[0]
        await finish(new_leader, "second try")
        rest = await asyncio.gather(*[t for t in waiting if t is not done[0]])
    assert all(isinstance(d, Reply) and text_of(d) == "second try" for _, d in rest)


async def test_follower_waits_at_most_max_wait_then_goes_alone():
    async with harness(Coalescing, {"max_wait_seconds": 0.2}) as gw:
        leader, _ = await start(gw, chat_body("slow"))
        t0 = time.perf_counter()
        life, decision = await start(gw, chat_body("slow"))
        waited = time.perf_counter() - t0
        await finish(leader)
    assert isinstance(decision, Continue) and 0.15 < waited < 1.0
    assert life.ctx.cache_lookups == [("coalescing", "timeout")]


async def test_unshareable_answer_sends_followers_upstream_on_their_own():
    async with harness(Coalescing, {"max_answer_bytes": 64}) as gw:
        leader, _ = await start(gw, chat_body("big"))
        waiting = await followers(gw, 3, chat_body("big"))
        await finish(leader, "a long answer " * 20)
        results = await asyncio.gather(*waiting)
    assert all(isinstance(d, Continue) for _, d in results)
    assert all(life.ctx.cache_lookups == [("coalescing", "alone")] for life, _ in results)


async def test_only_deterministic_requests_and_no_cache_opts_out():
    async with harness(Coalescing) as gw:
        hot, d1 = await start(gw, chat_body("q", temperature=0.9))
        hot2, d2 = await start(gw, chat_body("q", temperature=0.9))
        leader, _ = await start(gw, chat_body("q"))
        fresh, d3 = await start(gw, chat_body("q"), headers={"cache-control": "no-cache"})
        for life in (hot, hot2, leader, fresh):
            await finish(life)
    assert isinstance(d1, Continue) and isinstance(d2, Continue) and isinstance(d3, Continue)
    assert hot2.ctx.cache_lookups == [("coalescing", "skip")]
    assert fresh.ctx.cache_lookups == [("coalescing", "bypass")]


async def test_a_follower_leaving_does_not_disturb_the_others():
    async with harness(Coalescing) as gw:
        leader, _ = await start(gw, chat_body("q"))
        waiting = await followers(gw, 3, chat_body("q"))
        waiting[0].cancel()
        await finish(leader)
        results = await asyncio.gather(*waiting[1:])
    assert all(isinstance(d, Reply) for _, d in results)


async def test_across_workers_through_redis(redis_url):
    async with harness(Coalescing, redis_url=redis_url, prefix="co-x:") as one, \
            harness(Coalescing, redis_url=redis_url, prefix="co-x:") as two:
        leader, d = await start(one, chat_body("cross"))
        assert isinstance(d, Continue)
        remote = await followers(two, 3, chat_body("cross", stream=True))
        assert not any(t.done() for t in remote)
        assert plugin_of(two, "Coalescing").in_flight == 1  # one Redis poller for its three waiters
        await finish(leader, "from the other worker")
        results = await asyncio.gather(*remote)
    assert all(isinstance(d, Reply) and text_of(d) == "from the other worker" for _, d in results)


async def test_a_running_leader_keeps_its_lock_alive(redis_url):
    settings = {"lock_ttl_seconds": 1.0}
    async with harness(Coalescing, settings, redis_url=redis_url, prefix="co-hb:") as one, \
            harness(Coalescing, settings, redis_url=redis_url, prefix="co-hb:") as two:
        leader, _ = await start(one, chat_body("long"))
        remote = asyncio.create_task(start(two, chat_body("long")))
        await asyncio.sleep(1.6)  # longer than the lock TTL: only the heartbeat keeps it
        assert not remote.done()
        await finish(leader, "worth the wait")
        _, d = await remote
    assert isinstance(d, Reply) and text_of(d) == "worth the wait"


async def test_a_dead_leader_elsewhere_is_replaced_when_its_lock_expires(redis_url):
    settings = {"lock_ttl_seconds": 1.0}
    async with harness(Coalescing, settings, redis_url=redis_url, prefix="co-dead:") as gw:
        cache = plugin_of(gw, "Coalescing")
        probe, _ = await start(gw, chat_body("orphan"))  # learn the key the request maps to
        key = cache.key(probe.ctx)
        await finish(probe)
        await cache.store.set_nx("co:lock:" + key, b"a-process-that-died", 1.0)  # nobody will publish
        t0 = time.perf_counter()
        life, d = await start(gw, chat_body("orphan"))
        waited = time.perf_counter() - t0
        await finish(life)
    assert isinstance(d, Continue) and 0.7 < waited < 3.0  # took over after the lock expired


async def test_redis_down_still_coalesces_within_the_worker():
    async with harness(Coalescing, redis_url="redis://127.0.0.1:1/0") as gw:
        leader, d = await start(gw, chat_body("q"))
        waiting = await followers(gw, 3, chat_body("q"))
        await finish(leader)
        results = await asyncio.gather(*waiting)
    assert isinstance(d, Continue) and all(isinstance(r, Reply) for _, r in results)
