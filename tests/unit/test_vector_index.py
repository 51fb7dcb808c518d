"""The scoped vector index, in memory and on a real (plain) Redis: search, bounds, LRU, expiry, sharing."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from extproc.state.memory import MemoryStore
from extproc.state.redis_store import RedisStore
from extproc.state.store import StoreUnavailable
from extproc_plugins.caching.vector_index import MemoryVectorIndex, RedisVectorIndex, open_vector_index

DIM = 8


def unit(*values) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


@pytest.fixture(params=["memory", "redis"])
async def make_index(request):
    stores = []

    def make(**kw):
        if request.param == "memory":
            return MemoryVectorIndex(DIM, **kw)
        if not stores:
            stores.append(RedisStore(request.getfixturevalue("redis_url"), prefix=f"v{uuid.uuid4().hex[:8]}:"))
        s = stores[0]
        return RedisVectorIndex(s.client, s.prefix, s.errors, DIM, max_per_scope=kw.get("max_per_scope", 256),
                                mirror_max_vectors=kw.get("max_vectors", 50_000))

    yield make
    for s in stores:
        await s.close()


async def test_search_ranks_by_cosine_within_the_scope(make_index):
    index = make_index()
    await index.add("s1", "a", unit(1, 0), ttl=60)
    await index.add("s1", "b", unit(1, 1), ttl=60)
    await index.add("s2", "c", unit(1, 0), ttl=60)
    found = await index.search("s1", unit(1, 0.1), k=4)
    assert [i for i, _ in found] == ["a", "b"]
    assert found[0][1] > 0.99 and found[1][1] == pytest.approx(float(unit(1, 0.1) @ unit(1, 1)), abs=1e-5)
    assert [i for i, _ in await index.search("s1", unit(1, 0.1), k=4, min_score=0.9)] == ["a"]
    assert await index.search("missing", unit(1)) == []


async def test_per_scope_bound_evicts_least_recently_used(make_index):
    index = make_index(max_per_scope=3)
    for i in range(3):
        await index.add("s", f"e{i}", unit(1, i), ttl=60)
        await asyncio.sleep(0.005)
    await index.touch("s", "e0")  # e0 used: e1 is now the least recently used
    await asyncio.sleep(0.005)
    await index.add("s", "e3", unit(0, 1), ttl=60)
    ids = {i for i, _ in await index.search("s", unit(1, 1), k=10)}
    assert ids == {"e0", "e2", "e3"}


async def test_expired_entries_never_match(make_index):
    index = make_index()
    await index.add("s", "old", unit(1), ttl=0.05)
    await index.add("s", "new", unit(1, 0.5), ttl=60)
    await asyncio.sleep(0.1)
    assert [i for i, _ in await index.search("s", unit(1), k=5)] == ["new"]


async def test_remove(make_index):
    index = make_index()
    await index.add("s", "a", unit(1), ttl=60)
    await index.add("s", "b", unit(0, 1), ttl=60)
    await index.remove("s", "a")
    assert [i for i, _ in await index.search("s", unit(1), k=5)] == ["b"]


async def test_concurrent_writers_never_push_a_scope_past_its_bound(make_index):
    index = make_index(max_per_scope=10)
    await asyncio.gather(*[index.add("s", f"e{i}", unit(1, i % 7, i % 3), ttl=60) for i in range(60)])
    assert len(await index.search("s", unit(1), k=100)) == 10


async def test_redis_index_is_shared_and_mirror_refreshes_on_change(redis_url):
    store = RedisStore(redis_url, prefix=f"v{uuid.uuid4().hex[:8]}:")
    try:
        a = RedisVectorIndex(store.client, store.prefix, store.errors, DIM)
        b = RedisVectorIndex(store.client, store.prefix, store.errors, DIM)  # another worker/gateway
        await a.add("s", "x", unit(1), ttl=60)
        assert [i for i, _ in await b.search("s", unit(1))] == ["x"]
        assert b.mirrored == 1
        await a.add("s", "y", unit(0, 1), ttl=60)  # b's mirror is stale: the token changed
        assert {i for i, _ in await b.search("s", unit(1, 1), k=5)} == {"x", "y"}
        await a.remove("s", "x")
        assert [i for i, _ in await b.search("s", unit(1, 1), k=5)] == ["y"]
    finally:
        await store.close()


async def test_redis_mirror_is_bounded(redis_url):
    store = RedisStore(redis_url, prefix=f"v{uuid.uuid4().hex[:8]}:")
    try:
        index = RedisVectorIndex(store.client, store.prefix, store.errors, DIM, mirror_max_vectors=20)
        for s in range(10):
            for i in range(5):
                await index.add(f"s{s}", f"e{i}", unit(1, i), ttl=60)
            await index.search(f"s{s}", unit(1))
        assert index.mirrored <= 20
        assert len(await index.search("s0", unit(1), k=10)) == 5  # evicted from the mirror, not from Redis
    finally:
        await store.close()


def test_memory_index_total_bound_drops_least_recently_used_scopes():
    async def run():
        index = MemoryVectorIndex(DIM, max_per_scope=10, max_vectors=25)
        for s in range(10):
            for i in range(5):
                await index.add(f"s{s}", f"e{i}", unit(1, i), ttl=60)
        return index, await index.search("s9", unit(1), k=10), await index.search("s0", unit(1), k=10)

    index, newest, oldest = asyncio.run(run())
    assert index.total <= 25 and len(newest) == 5 and oldest == []


async def test_unreachable_redis_raises_store_unavailable():
    store = RedisStore("redis://127.0.0.1:1/0", timeout=0.2)
    try:
        index = open_vector_index(store, dim=DIM)
        assert isinstance(index, RedisVectorIndex)
        with pytest.raises(StoreUnavailable):
            await index.search("s", unit(1))
        with pytest.raises(StoreUnavailable):
            await index.add("s", "a", unit(1), ttl=1)
    finally:
        await store.close()
    assert isinstance(open_vector_index(MemoryStore(), dim=DIM), MemoryVectorIndex)
