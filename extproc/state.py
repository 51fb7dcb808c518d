"""Shared state for policies: one small interface, in memory or in Redis.

Policies never talk to Redis directly: they get :attr:`Gateway.store <extproc.gateway.Gateway.store>`,
which is a :class:`MemoryStore` (one process; the embedded default) or a :class:`RedisStore` (shared
by every worker and every gateway instance) depending on ``state.redis_url``. Both offer the same
operations: bytes values with a TTL, and atomic counters.

The memory store is bounded (``max_bytes``, least recently used out first) so a gateway under
sustained load does not grow without limit.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Protocol

from .config import StateConfig


class Store(Protocol):
    """Key/value with TTL and atomic counters; every method may raise :class:`StoreUnavailable`."""

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...
    async def stream_add(self, key: str, entries: list[bytes], maxlen: int) -> None: ...
    async def stream_range(self, key: str, count: int | None = None) -> list[bytes]: ...
    async def set_nx(self, key: str, value: bytes, ttl: float) -> bool: ...
    async def delete_if(self, key: str, expected: bytes) -> bool: ...
    async def expire_if(self, key: str, expected: bytes, ttl: float) -> bool: ...


class StoreUnavailable(RuntimeError):
    """The backing store could not be reached; callers degrade (no cache) rather than fail."""


class MemoryStore:
    """An in-process store bounded by ``max_bytes`` (LRU eviction) with per-key TTL."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, prefix: str = ""):
        self.max_bytes = max_bytes
        self.prefix = prefix
        self._data: OrderedDict[str, tuple[bytes | int, float | None]] = OrderedDict()
        self._bytes = 0
        self._streams: dict[str, deque[bytes]] = {}

    @staticmethod
    def _size(key: str, value) -> int:
        return len(key) + (len(value) if isinstance(value, bytes) else 8) + 64

    def _live(self, key: str):
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= time.monotonic():
            self._remove(key)
            return None
        self._data.move_to_end(key)
        return item

    def _remove(self, key: str) -> None:
        value, _ = self._data.pop(key)
        self._bytes -= self._size(key, value)

    def _put(self, key: str, value, ttl: float | None) -> None:
        if key in self._data:
            self._remove(key)
        size = self._size(key, value)
        if size > self.max_bytes:
            return
        self._data[key] = (value, time.monotonic() + ttl if ttl else None)
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._remove(next(iter(self._data)))

    @property
    def used_bytes(self) -> int:
        return self._bytes

    async def get(self, key: str) -> bytes | None:
        item = self._live(self.prefix + key)
        return item[0] if item is not None and isinstance(item[0], bytes) else None

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self._put(self.prefix + key, bytes(value), ttl)

    async def delete(self, key: str) -> None:
        if self.prefix + key in self._data:
            self._remove(self.prefix + key)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        key = self.prefix + key
        item = self._live(key)
        if item is None:
            value, expires = amount, (time.monotonic() + ttl if ttl else None)
        else:
            value, expires = int(item[0]) + amount, item[1]
        self._data[key] = (value, expires)
        if item is None:
            self._bytes += self._size(key, value)
        return value

    async def ping(self) -> bool:
        return True

    async def stream_add(self, key: str, entries: list[bytes], maxlen: int) -> None:
        """Append entries to a capped log (the oldest fall off past ``maxlen``)."""
        stream = self._streams.get(self.prefix + key)
        if stream is None or stream.maxlen != maxlen:
            stream = self._streams[self.prefix + key] = deque(stream or (), maxlen=maxlen)
        stream.extend(bytes(e) for e in entries)

    async def stream_range(self, key: str, count: int | None = None) -> list[bytes]:
        """The log's entries, oldest first (the first ``count`` of them)."""
        entries = list(self._streams.get(self.prefix + key, ()))
        return entries if count is None else entries[:count]

    async def set_nx(self, key: str, value: bytes, ttl: float) -> bool:
        """Set ``key`` only if it is absent (a lock or a claim); True when this call set it."""
        if self._live(self.prefix + key) is not None:
            return False
        self._put(self.prefix + key, bytes(value), ttl)
        return True

    async def delete_if(self, key: str, expected: bytes) -> bool:
        """Delete ``key`` only if it still holds ``expected`` (release a lock this caller owns)."""
        item = self._live(self.prefix + key)
        if item is None or item[0] != expected:
            return False
        self._remove(self.prefix + key)
        return True

    async def expire_if(self, key: str, expected: bytes, ttl: float) -> bool:
        """Give ``key`` a new TTL only if it still holds ``expected`` (keep an owned lock alive)."""
        item = self._live(self.prefix + key)
        if item is None or item[0] != expected:
            return False
        self._data[self.prefix + key] = (item[0], time.monotonic() + ttl)
        return True

    async def close(self) -> None:
        self._data.clear()
        self._bytes = 0
        self._streams.clear()


class RedisStore:
    """The same interface on Redis (plain Redis: no modules needed)."""

    def __init__(self, url: str, prefix: str = "extproc:", timeout: float = 0.5):
        import redis.asyncio as redis

        self.prefix = prefix
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._errors = (redis.RedisError, OSError)
        self._scripts: dict = {}

    async def _do(self, coro):
        try:
            return await coro
        except self._errors as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def get(self, key: str) -> bytes | None:
        return await self._do(self._redis.get(self.prefix + key))

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        px = int(ttl * 1000) if ttl else None
        await self._do(self._redis.set(self.prefix + key, value, px=px))

    async def delete(self, key: str) -> None:
        await self._do(self._redis.delete(self.prefix + key))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        key = self.prefix + key
        if ttl is None:
            return int(await self._do(self._redis.incrby(key, amount)))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, amount)
            pipe.pexpire(key, int(ttl * 1000), nx=True)
            value, _ = await self._do(pipe.execute())
        return int(value)

    async def stream_add(self, key: str, entries: list[bytes], maxlen: int) -> None:
        """XADD each entry (field ``r``) to a stream capped near ``maxlen`` (``MAXLEN ~``), one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.xadd(self.prefix + key, {"r": entry}, maxlen=maxlen, approximate=True)
            await self._do(pipe.execute())

    async def stream_range(self, key: str, count: int | None = None) -> list[bytes]:
        """The stream's entries (field ``r``), oldest first."""
        rows = await self._do(self._redis.xrange(self.prefix + key, count=count))
        return [fields[b"r"] for _id, fields in rows if b"r" in fields]

    # Compare-and-act scripts: atomic on the server (EVALSHA; plain Redis, no modules).
    _DELETE_IF = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
    _EXPIRE_IF = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                  "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0")

    async def set_nx(self, key: str, value: bytes, ttl: float) -> bool:
        """SET NX PX: set ``key`` only if it is absent (a lock or a claim); True when this call set it."""
        return bool(await self._do(self._redis.set(self.prefix + key, value, px=max(1, int(ttl * 1000)), nx=True)))

    async def delete_if(self, key: str, expected: bytes) -> bool:
        """Delete ``key`` only if it still holds ``expected`` (release a lock this caller owns)."""
        script = self._scripts.get("delete_if") or self._scripts.setdefault(
            "delete_if", self._redis.register_script(self._DELETE_IF))
        return bool(await self._do(script(keys=[self.prefix + key], args=[expected])))

    async def expire_if(self, key: str, expected: bytes, ttl: float) -> bool:
        """Give ``key`` a new TTL only if it still holds ``expected`` (keep an owned lock alive)."""
        script = self._scripts.get("expire_if") or self._scripts.setdefault(
            "expire_if", self._redis.register_script(self._EXPIRE_IF))
        return bool(await self._do(script(keys=[self.prefix + key], args=[expected, max(1, int(ttl * 1000))])))

    @property
    def client(self):
        """The ``redis.asyncio`` client, for shared-state modules with their own data layout
        (:mod:`extproc.vector_index`); policies use the methods above. Errors it raises are in
        :attr:`errors`."""
        return self._redis

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions that mean "Redis unavailable" (to map to :class:`StoreUnavailable`)."""
        return self._errors

    async def ping(self) -> bool:
        try:
            return bool(await self._do(self._redis.ping()))
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def open_store(config: StateConfig) -> Store:
    """The store the configuration asks for."""
    if config.redis_url:
        return RedisStore(config.redis_url, prefix=config.key_prefix)
    return MemoryStore(prefix=config.key_prefix)
