"""Store operations for locks and claims (set_nx, delete_if, expire_if): memory and real Redis alike."""

from __future__ import annotations

import asyncio

import pytest

from extproc.state.redis_store import RedisStore
from extproc.state.store import StoreUnavailable


async def test_set_nx_only_one_of_many_concurrent_callers_wins(store):
    won = await asyncio.gather(*[store.set_nx("lock", f"owner{i}".encode(), ttl=5) for i in range(20)])
    assert won.count(True) == 1
    owner = (await store.get("lock"))
    assert owner == f"owner{won.index(True)}".encode()


async def test_set_nx_after_expiry_succeeds(store):
    assert await store.set_nx("lock", b"a", ttl=0.05)
    assert not await store.set_nx("lock", b"b", ttl=0.05)
    await asyncio.sleep(0.12)
    assert await store.set_nx("lock", b"b", ttl=5)
    assert await store.get("lock") == b"b"


async def test_delete_if_releases_only_the_owners_lock(store):
    await store.set_nx("lock", b"mine", ttl=5)
    assert not await store.delete_if("lock", b"someone-else")
    assert await store.get("lock") == b"mine"
    assert await store.delete_if("lock", b"mine")
    assert await store.get("lock") is None
    assert not await store.delete_if("lock", b"mine")  # already gone


async def test_expire_if_extends_only_the_owners_lock(store):
    await store.set_nx("lock", b"mine", ttl=0.1)
    assert not await store.expire_if("lock", b"other", ttl=5)
    assert await store.expire_if("lock", b"mine", ttl=5)
    await asyncio.sleep(0.2)
    assert await store.get("lock") == b"mine"  # kept alive past its first TTL
    assert not await store.expire_if("missing", b"mine", ttl=5)


async def test_lock_ops_on_unreachable_redis_raise_store_unavailable():
    s = RedisStore("redis://127.0.0.1:1/0", timeout=0.2)
    try:
        for op in (s.set_nx("k", b"v", 1), s.delete_if("k", b"v"), s.expire_if("k", b"v", 1)):
            with pytest.raises(StoreUnavailable):
                await op
    finally:
        await s.close()
