"""The store on Redis (plain Redis: no modules needed), shared by every worker and gateway."""

from __future__ import annotations

from typing import Sequence

from extproc.state.lua import script
from extproc.state.store import StoreUnavailable


class RedisStore:
    """The same interface on Redis (plain Redis: no modules needed)."""

    def __init__(self, url: str, prefix: str = "extproc:", timeout: float = 0.5, max_connections: int = 64):
        import redis.asyncio as redis

        self.prefix = prefix
        # A blocking pool: past max_connections a command waits for a free connection (commands
        # take well under a millisecond) instead of failing with "Too many connections" when a
        # worker has more requests in flight than connections.
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=max(2.0, 4 * timeout),
            socket_timeout=timeout, socket_connect_timeout=timeout)
        self._redis = redis.Redis(connection_pool=pool)
        self._errors = (redis.RedisError, OSError)
        self._scripts: dict = {}
        self._on_close: list = []  # connections of its own that others opened (reservation lanes)

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

    # Compare-and-act scripts (lua/*.lua): atomic on the server (EVALSHA; plain Redis, no modules).
    def _script(self, name: str):
        found = self._scripts.get(name)
        if found is None:
            found = self._scripts[name] = self._redis.register_script(script(__package__, name))
        return found

    async def set_nx(self, key: str, value: bytes, ttl: float) -> bool:
        """SET NX PX: set ``key`` only if it is absent (a lock or a claim); True when this call set it."""
        return bool(await self._do(self._redis.set(self.prefix + key, value, px=max(1, int(ttl * 1000)), nx=True)))

    async def delete_if(self, key: str, expected: bytes) -> bool:
        """Delete ``key`` only if it still holds ``expected`` (release a lock this caller owns)."""
        return bool(await self._do(self._script("delete_if")(keys=[self.prefix + key], args=[expected])))

    async def expire_if(self, key: str, expected: bytes, ttl: float) -> bool:
        """Give ``key`` a new TTL only if it still holds ``expected`` (keep an owned lock alive)."""
        run = self._script("expire_if")
        return bool(await self._do(run(keys=[self.prefix + key], args=[expected, max(1, int(ttl * 1000))])))

    @property
    def client(self):
        """The ``redis.asyncio`` client, for shared-state modules with their own data layout
        (:mod:`extproc_plugins.caching.vector_index`, budget reservations); policies use the methods above. Errors it raises are in
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

    def on_close(self, disconnect) -> None:
        """Have :meth:`close` also await ``disconnect()`` (a connection taken from :attr:`client`'s pool)."""
        self._on_close.append(disconnect)

    async def close(self) -> None:
        for disconnect in self._on_close:
            await disconnect()
        await self._redis.aclose()

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        return await self._do(self._redis.mget([self.prefix + k for k in keys]))

    async def put_record(self, key: str, value: bytes) -> None:
        await self._do(self._redis.set(self.prefix + key, value))

    async def get_record(self, key: str) -> bytes | None:
        return await self._do(self._redis.get(self.prefix + key))

    async def get_records(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self.get_many(keys)

    async def delete_record(self, key: str) -> bool:
        return bool(await self._do(self._redis.delete(self.prefix + key)))
