"""The shared-state store: the same behaviour in memory and on a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from extproc.state.memory import MemoryStore
from extproc.state.redis_store import RedisStore
from extproc.state.store import StoreUnavailable


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


@pytest.mark.parametrize("value_bytes", [16, 64, 512, 4096])
def test_memory_store_bound_is_its_real_memory(value_bytes):
    """max_bytes bounds what the entries really take (Python objects included): small entries (locks,
    claims) used to be counted as their lengths + 64 and really held up to 2.7 times the bound."""
    import gc
    import os
    import tracemalloc

    async def fill(s):
        for i in range(20_000):
            await s.set(f"key:{i:032d}", os.urandom(value_bytes), ttl=60)

    gc.collect()
    tracemalloc.start()
    try:
        s = MemoryStore(max_bytes=256 * 1024)
        asyncio.run(fill(s))
        gc.collect()
        real = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert s.used_bytes <= s.max_bytes
    assert real <= 1.25 * s.max_bytes, f"{len(s._data)} entries really take {real} B for a bound of {s.max_bytes}"


def test_memory_store_counters_count_against_the_bound():
    """incr() of new keys used to add to the store without ever evicting: unbounded with distinct keys."""
    s = MemoryStore(max_bytes=10_000)

    async def run():
        for i in range(5_000):
            await s.incr(f"n{i}", 1, ttl=60)
        assert await s.incr("n4999", 2) == 3  # the newest survive, and keep counting

    asyncio.run(run())
    assert s.used_bytes <= 10_000 and len(s._data) < 100


async def test_redis_down_raises_store_unavailable_quickly():
    s = RedisStore("redis://127.0.0.1:1/0", timeout=0.2)
    assert await s.ping() is False
    with pytest.raises(StoreUnavailable):
        await s.get("k")
    await s.close()


def test_every_lua_script_ships_as_package_data():
    # Scripts are files (lua/*.lua) read with importlib.resources: a wheel without them would
    # fail at the first Redis call, so pyproject's package-data must cover each one.
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    scripts = [p.relative_to(root) for top in ("extproc", "extproc_plugins") for p in (root / top).rglob("*.lua")]
    assert len(scripts) >= 8
    for path in scripts:
        top, rest = path.parts[0], "/".join(path.parts[1:])
        assert any(fnmatch.fnmatch(rest, g) for g in data.get(top, [])), f"{path} is not in package-data"
