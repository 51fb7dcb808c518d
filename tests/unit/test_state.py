"""The shared-state store: the same behaviour in memory and on a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from extproc.state import MemoryStore, RedisStore, StoreUnavailable


async def test_set_get_delete(store):
    assert await store.get("k") is None
    await store.set("k", b"v")
    assert await store.get("k") == b"v"
    await store.delete("k")
    assert await store.get("k") is None


async def test_ttl_expires(store):
    await store.set("k", b"v", ttl=0.05)
    assert await store.get("k") == b"v"
    await asyncio.sleep(0.12)
    assert await store.get("k") is None


async def test_incr_is_atomic_under_concurrency(store):
    results = await asyncio.gather(*[store.incr("n", 2, ttl=10) for _ in range(50)])
    assert sorted(results) == list(range(2, 101, 2))


def test_memory_store_is_bounded_lru():
    s = MemoryStore(max_bytes=2000)

    async def fill():
        for i in range(100):
            await s.set(f"k{i}", b"x" * 100)
        await s.get("k99")
        return [await s.get(f"k{i}") for i in range(100)]

    values = asyncio.run(fill())
    assert s.used_bytes <= 2000
    assert values[99] == b"x" * 100 and values[0] is None


async def test_redis_down_raises_store_unavailable_quickly():
    s = RedisStore("redis://127.0.0.1:1/0", timeout=0.2)
    assert await s.ping() is False
    with pytest.raises(StoreUnavailable):
        await s.get("k")
    await s.close()
