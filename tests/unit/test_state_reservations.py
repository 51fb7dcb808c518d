"""Atomic reservations (reserve / commit / release) and records: identical in memory and on Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from extproc_plugins.budgets.reservations import reservations_for
from extproc_plugins.budgets.reservations import Charge
from extproc.state.memory import MemoryStore
from extproc.state.redis_store import RedisStore
from extproc.state.store import StoreUnavailable


def later(seconds: float = 60) -> float:
    return time.time() + seconds


async def test_reserve_charges_all_or_nothing(store):
    charges = [Charge("a", 5, 10, later()), Charge("b", 5, 7, later())]
    first = await reservations_for(store).reserve("r1", charges, ttl=60)
    assert first.ok and first.levels == [0, 0] and first.failed is None
    second = await reservations_for(store).reserve("r2", charges, ttl=60)  # b would reach 10 > 7
    assert not second.ok and second.failed == 1 and second.levels == [5, 5]
    assert await reservations_for(store).read_counters(["a", "b"]) == [(5, 5), (5, 5)]  # nothing charged by r2


async def test_commit_reconciles_to_real_usage_once(store):
    await reservations_for(store).reserve("r1", [Charge("tok", 100, 1000, later()), Charge("req", 1, None, later())], ttl=60)
    assert await reservations_for(store).commit("r1", {"tok": 37})
    assert await reservations_for(store).read_counters(["tok", "req"]) == [(37, 0), (1, 0)]  # req kept its reserved 1
    assert not await reservations_for(store).commit("r1", {"tok": 50})  # settled already: no double charge
    assert not await reservations_for(store).release("r1")
    assert await reservations_for(store).read_counters(["tok"]) == [(37, 0)]


async def test_release_gives_everything_back(store):
    await reservations_for(store).reserve("r1", [Charge("tok", 100, 1000, later())], ttl=60)
    await reservations_for(store).reserve("r2", [Charge("tok", 50, 1000, later())], ttl=60)
    assert await reservations_for(store).release("r1")
    assert await reservations_for(store).read_counters(["tok"]) == [(50, 50)]
    assert not await reservations_for(store).release("r1")
    assert await reservations_for(store).commit("r2", {"tok": 60})
    assert await reservations_for(store).read_counters(["tok"]) == [(60, 0)]


async def test_commit_may_go_over_the_limit_but_then_refuses(store):
    await reservations_for(store).reserve("r1", [Charge("tok", 10, 10, later())], ttl=60)
    await reservations_for(store).commit("r1", {"tok": 15})  # the model used more than estimated: spend is spend
    refused = await reservations_for(store).reserve("r2", [Charge("tok", 0, 10, later())], ttl=60)
    assert not refused.ok and refused.levels == [15]


async def test_unlimited_counters_just_count(store):
    for i in range(3):
        assert (await reservations_for(store).reserve(f"r{i}", [Charge("n", 1000, None, later())], ttl=60)).ok
    assert await reservations_for(store).read_counters(["n", "missing"]) == [(3000, 3000), (0, 0)]


async def test_no_check_then_increment_race(store):
    """200 concurrent reservations of 1 against a limit of 50: exactly 50 succeed."""
    results = await asyncio.gather(*[
        reservations_for(store).reserve(f"r{i}", [Charge("c", 1, 50, later())], ttl=60) for i in range(200)])
    assert sum(r.ok for r in results) == 50
    assert await reservations_for(store).read_counters(["c"]) == [(50, 50)]


async def test_counters_expire_with_their_window(store):
    await reservations_for(store).reserve("r1", [Charge("w", 5, 10, time.time() + 0.15)], ttl=60)
    assert (await reservations_for(store).read_counters(["w"]))[0][0] == 5
    await asyncio.sleep(0.3)
    assert await reservations_for(store).read_counters(["w"]) == [(0, 0)]
    assert await reservations_for(store).commit("r1", {"w": 3})  # the window is gone: nothing to adjust, no error
    assert await reservations_for(store).read_counters(["w"]) == [(0, 0)]


async def test_reservation_ttl_expires_without_settling(store):
    await reservations_for(store).reserve("r1", [Charge("x", 5, None, later())], ttl=0.1)
    await asyncio.sleep(0.25)
    assert not await reservations_for(store).release("r1")  # forgotten: the worst case stays charged (conservative)
    assert (await reservations_for(store).read_counters(["x"]))[0][0] == 5


async def test_records_and_get_many(store):
    assert await store.get_record("k") is None
    await store.put_record("k", b"v")
    assert await store.get_record("k") == b"v"
    assert await store.get_records(["k", "nope"]) == [b"v", None]
    assert await store.delete_record("k")
    assert not await store.delete_record("k")
    await store.set("a", b"1")
    assert await store.get_many(["a", "b"]) == [b"1", None]


def test_memory_records_survive_cache_pressure_and_are_capped():
    s = MemoryStore(max_bytes=2000, max_records=3)

    async def run():
        await s.put_record("key", b"secret")
        for i in range(100):
            await s.set(f"c{i}", b"x" * 100)
        assert await s.get_record("key") == b"secret"
        await s.put_record("k2", b"")
        await s.put_record("k3", b"")
        with pytest.raises(StoreUnavailable):
            await s.put_record("k4", b"")
        await s.put_record("k3", b"again")  # replacing one is fine

    asyncio.run(run())


def test_memory_counters_are_bounded_and_swept():
    s = MemoryStore()
    reservations_for(s).max_counters = 10

    async def run():
        for i in range(5):
            assert (await reservations_for(s).reserve(f"r{i}", [Charge(f"c{i}", 1, None, time.time() + 0.05)], ttl=0.05)).ok
        with pytest.raises(StoreUnavailable):  # full: refusing is safer than forgetting spend
            await reservations_for(s).reserve("r5", [Charge("c5", 1, None, time.time() + 0.05)], ttl=0.05)
        await asyncio.sleep(0.1)
        assert (await reservations_for(s).reserve("r6", [Charge("c6", 1, None, later())], ttl=60)).ok  # expired ones swept
        assert len(reservations_for(s)._counters) == 2 and len(reservations_for(s)._reservations) == 1

    asyncio.run(run())


async def test_redis_down_reserve_raises_store_unavailable():
    s = RedisStore("redis://127.0.0.1:1/0", timeout=0.2)
    with pytest.raises(StoreUnavailable):
        await reservations_for(s).reserve("r", [Charge("c", 1, 1, later())], ttl=1)
    with pytest.raises(StoreUnavailable):
        await reservations_for(s).commit("r", {"c": 1})
    await s.close()


async def test_redis_batches_concurrent_scripts_and_reloads_forgotten_ones(redis_url):
    s = RedisStore(redis_url, prefix=f"b{uuid.uuid4().hex[:8]}:")
    assert (await reservations_for(s).reserve("warm", [Charge("c", 0, None, later())], ttl=60)).ok
    await s._redis.script_flush()  # as after a Redis restart: the scripts are gone
    results = await asyncio.gather(*[reservations_for(s).reserve(f"r{i}", [Charge("c", 1, 10, later())], ttl=60) for i in range(30)])
    assert sum(r.ok for r in results) == 10
    settled = await asyncio.gather(*[reservations_for(s).release(f"r{i}") for i in range(30)])
    assert sum(settled) == 10 and await reservations_for(s).read_counters(["c"]) == [(0, 0)]
    await s.close()


async def test_redis_down_fails_every_batched_call():
    s = RedisStore("redis://127.0.0.1:1/0", timeout=0.2)
    results = await asyncio.gather(*[reservations_for(s).reserve(f"r{i}", [Charge("c", 1, 1, later())], ttl=1) for i in range(5)],
                                   return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert not reservations_for(s)._admit_lane.busy and not reservations_for(s)._settle_lane.busy  # nothing left waiting
    await s.close()


async def test_orphaned_reservation_is_swept_as_spent(store):
    """A reservation its gateway never settled (crashed): past its TTL the worst case stays charged,
    and turns from reserved into spent, so nothing is left "reserved" until the window ends."""
    reservations_for(store).sweep_every = 1  # Redis: look for orphans at every admission (memory: on expiry)
    await reservations_for(store).reserve("orphan", [Charge("x", 5, None, later()), Charge("y", 7, 100, later())], ttl=0.1)
    await reservations_for(store).reserve("live", [Charge("x", 1, None, later())], ttl=60)
    await asyncio.sleep(0.25)
    assert (await reservations_for(store).reserve("next", [Charge("z", 1, None, later())], ttl=60)).ok  # sweeps
    assert await reservations_for(store).read_counters(["x", "y"]) == [(6, 1), (7, 0)]
    assert not await reservations_for(store).release("orphan")  # too late: already charged as spent
    assert await reservations_for(store).commit("live", {"x": 2})  # a live one settles as usual
    assert await reservations_for(store).read_counters(["x", "y"]) == [(7, 0), (7, 0)]
