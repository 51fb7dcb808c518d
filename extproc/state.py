"""Shared state for policies: one small interface, in memory or in Redis.

Policies never talk to Redis directly: they get :attr:`Gateway.store <extproc.gateway.Gateway.store>`,
which is a :class:`MemoryStore` (one process; the embedded default) or a :class:`RedisStore` (shared
by every worker and every gateway instance) depending on ``state.redis_url``. Both offer the same
operations: bytes values with a TTL, and atomic counters.

The memory store is bounded (``max_bytes``, least recently used out first) so a gateway under
sustained load does not grow without limit.

**Reservations** (budgets and rate limits) are atomic check-and-charge operations over several
counters at once, with the same semantics in both stores (Redis: one Lua script per operation,
run with EVALSHA; memory: the same logic in one synchronous step of the event loop):

* :meth:`reserve` checks every counter against its limit and, only if all fit, charges them all
  and records the reservation (what it charged where), or charges nothing;
* :meth:`commit` replaces the reserved amounts by the real ones (reconcile), once;
* :meth:`release` takes the reserved amounts back (aborted or failed requests), once.

Each counter ``K`` holds spent + reserved; a companion ``K:held`` holds the reserved part, so
``K - K:held`` is what was really spent. Counters expire when their window is over. Budget
counters and records (API keys, budget settings) are never evicted by cache pressure: in memory
they live outside the LRU, bounded by expiry and by a count cap (past it, new ones raise
:class:`StoreUnavailable`: refusing is safer than forgetting spend).

The memory store is **per worker process**: with several workers (or gateways) each enforces its
own copy of every limit. Budgets that must hold across workers and gateways need Redis.
"""

from __future__ import annotations

import heapq
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

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
    # records (never evicted) and budget reservations: see the module docstring
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...
    async def put_record(self, key: str, value: bytes) -> None: ...
    async def get_record(self, key: str) -> bytes | None: ...
    async def get_records(self, keys: Sequence[str]) -> list[bytes | None]: ...
    async def delete_record(self, key: str) -> bool: ...
    async def reserve(self, reservation_id: str, charges: Sequence["Charge"], ttl: float) -> "ReserveResult": ...
    async def commit(self, reservation_id: str, actual: Mapping[str, int]) -> bool: ...
    async def release(self, reservation_id: str) -> bool: ...
    async def read_counters(self, keys: Sequence[str]) -> list[tuple[int, int]]: ...


@dataclass(slots=True)
class Charge:
    """One counter a reservation charges.

    :param key: the counter's key (the store adds its prefix).
    :param amount: what to charge (an integer: tokens, requests, nano-USD...).
    :param limit: the counter may not go over this; ``None`` counts without limit.
    :param expire_at: Unix time (seconds) after which the counter may disappear (its window is over).
    """

    key: str
    amount: int
    limit: int | None
    expire_at: float


@dataclass(slots=True)
class ReserveResult:
    """What :meth:`Store.reserve` did.

    :param ok: True when every counter fitted and all were charged; False when none was.
    :param levels: each counter's value (spent + reserved) *before* this reservation, in the
        order given (when refused: up to and including the one that did not fit).
    :param failed: index of the first charge that did not fit, or None.
    """

    ok: bool
    levels: list[int] = field(default_factory=list)
    failed: int | None = None


HELD_SUFFIX = ":held"


class StoreUnavailable(RuntimeError):
    """The backing store could not be reached; callers degrade (no cache) rather than fail."""


#: What an entry of :class:`MemoryStore` costs in CPython besides its key and value objects: the
#: ``(value, expiry)`` tuple (56 B), the expiry float (24 B) and its slot and link in the
#: OrderedDict (about 110 B, amortised). Measured with tracemalloc: with it the accounted bytes
#: match the real ones within a few per cent from 16-byte to 4 KB values; without it (key and
#: value lengths + 64) a store of small entries (locks, claims) really held 2.3 to 2.7 times its
#: ``max_bytes``.
ENTRY_OVERHEAD = 192


class MemoryStore:
    """An in-process store bounded by ``max_bytes`` (LRU eviction) with per-key TTL.

    ``max_bytes`` bounds the real memory of the entries (Python objects included, see
    :data:`ENTRY_OVERHEAD`), not only the length of their keys and values.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, prefix: str = "", *,
                 max_counters: int = 1_000_000, max_records: int = 100_000):
        self.max_bytes = max_bytes
        self.prefix = prefix
        self._data: OrderedDict[str, tuple[bytes | int, float | None]] = OrderedDict()
        self._bytes = 0
        # Budget state, outside the LRU (never evicted by cache pressure), bounded by expiry + caps.
        self.max_counters = max_counters
        self.max_records = max_records
        self._counters: dict[str, list] = {}  # key -> [value, expire_at (unix seconds)]
        self._reservations: dict[str, tuple[dict[str, int], float]] = {}  # id -> ({key: amount}, expires)
        self._expiry: list[tuple[float, int, str, str]] = []  # heap of (when, seq, kind, key)
        self._seq = 0
        self._records: dict[str, bytes] = {}
        self._streams: dict[str, deque[bytes]] = {}

    @staticmethod
    def _size(key: str, value) -> int:
        # counters (ints) count a fixed 32 B, so an entry's size never changes as it is incremented
        return sys.getsizeof(key) + (sys.getsizeof(value) if isinstance(value, bytes) else 32) + ENTRY_OVERHEAD

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
        self._evict()

    def _evict(self) -> None:
        """Drop the least recently used entries until the store is within ``max_bytes``."""
        while self._bytes > self.max_bytes and self._data:
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
            self._evict()  # a new counter counts against max_bytes like any entry
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
        self._counters.clear()
        self._reservations.clear()
        self._expiry.clear()
        self._records.clear()

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [await self.get(k) for k in keys]

    # records: small values that must not be evicted (API keys, budget settings)
    async def put_record(self, key: str, value: bytes) -> None:
        key = self.prefix + key
        if key not in self._records and len(self._records) >= self.max_records:
            raise StoreUnavailable(f"memory store holds its maximum of {self.max_records} records")
        self._records[key] = bytes(value)

    async def get_record(self, key: str) -> bytes | None:
        return self._records.get(self.prefix + key)

    async def get_records(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._records.get(self.prefix + k) for k in keys]

    async def delete_record(self, key: str) -> bool:
        return self._records.pop(self.prefix + key, None) is not None

    # reservations ------------------------------------------------------------------------
    def _sweep(self, now: float) -> None:
        """Forget counters whose window is over and reservations whose TTL passed."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, _, kind, key = heapq.heappop(heap)
            if kind == "c":
                item = self._counters.get(key)
                if item is not None and item[1] <= now:
                    del self._counters[key]
            else:
                item = self._reservations.get(key)
                if item is not None and item[1] <= now:
                    del self._reservations[key]

    def _schedule(self, when: float, kind: str, key: str) -> None:
        self._seq += 1
        heapq.heappush(self._expiry, (when, self._seq, kind, key))

    def _counter(self, key: str, now: float) -> int:
        item = self._counters.get(key)
        if item is None or item[1] <= now:
            return 0
        return item[0]

    def _add(self, key: str, amount: int, expire_at: float, now: float) -> None:
        item = self._counters.get(key)
        if item is None or item[1] <= now:
            self._counters[key] = [amount, expire_at]
            self._schedule(expire_at, "c", key)
        else:
            item[0] += amount
            if expire_at != item[1]:
                item[1] = expire_at
                self._schedule(expire_at, "c", key)

    async def reserve(self, reservation_id: str, charges: Sequence[Charge], ttl: float) -> ReserveResult:
        # No await inside: atomic with respect to every other coroutine of this worker.
        now = time.time()
        self._sweep(now)
        p = self.prefix
        levels: list[int] = []
        for i, c in enumerate(charges):
            level = self._counter(p + c.key, now)
            levels.append(level)
            if c.limit is not None and level + c.amount > c.limit:
                return ReserveResult(False, levels, i)
        new = sum(1 for c in charges if p + c.key not in self._counters) * 2
        if len(self._counters) + new > self.max_counters:
            raise StoreUnavailable(f"memory store holds its maximum of {self.max_counters} budget counters")
        held: dict[str, int] = {}
        for c in charges:
            key = p + c.key
            self._add(key, c.amount, c.expire_at, now)
            self._add(key + HELD_SUFFIX, c.amount, c.expire_at, now)
            held[key] = held.get(key, 0) + c.amount
        rid = p + "res:" + reservation_id
        self._reservations[rid] = (held, now + ttl)
        self._schedule(now + ttl, "r", rid)
        return ReserveResult(True, levels, None)

    def _settle(self, reservation_id: str, actual: Mapping[str, int] | None) -> bool:
        now = time.time()
        item = self._reservations.pop(self.prefix + "res:" + reservation_id, None)
        if item is None or item[1] <= now:
            return False
        held, _ = item
        plen = len(self.prefix)
        for key, reserved in held.items():
            final = 0 if actual is None else actual.get(key[plen:], reserved)
            counter = self._counters.get(key)
            if counter is not None and counter[1] > now and final != reserved:
                counter[0] += final - reserved
            hold = self._counters.get(key + HELD_SUFFIX)
            if hold is not None and hold[1] > now:
                hold[0] -= reserved
        return True

    async def commit(self, reservation_id: str, actual: Mapping[str, int]) -> bool:
        return self._settle(reservation_id, actual)

    async def release(self, reservation_id: str) -> bool:
        return self._settle(reservation_id, None)

    async def read_counters(self, keys: Sequence[str]) -> list[tuple[int, int]]:
        now = time.time()
        p = self.prefix
        return [(self._counter(p + k, now), self._counter(p + k + HELD_SUFFIX, now)) for k in keys]


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
        self._scripts_busy = False
        self._script_batch: list = []

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

    # reservations: one Lua script each, run with EVALSHA (a script Redis forgot, e.g. after a
    # restart, is loaded again). Plain Redis, no modules; not Redis Cluster (keys of several
    # tenants). Calls made in the same turn of the event loop go out as one pipeline (each script
    # still runs atomically on its own): under concurrency the per-command client overhead, not
    # Redis, is the cost, and batching divides it.
    def _script(self, name: str, source: str):
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self._redis.register_script(source)
        return script

    async def _run_script(self, name: str, source: str, keys: list, args: list):
        """Run a script; while one call is on the wire, later ones wait and go out together."""
        import asyncio

        script = self._script(name, source)
        if self._scripts_busy:
            future = asyncio.get_running_loop().create_future()
            self._script_batch.append((script, keys, args, future))
            return await future
        self._scripts_busy = True
        try:
            return await self._do(script(keys=keys, args=args))
        finally:
            self._next_script_batch()

    def _next_script_batch(self) -> None:
        import asyncio

        if self._script_batch:
            batch, self._script_batch = self._script_batch, []
            asyncio.get_running_loop().create_task(self._flush_scripts(batch))  # stays busy
        else:
            self._scripts_busy = False

    async def _flush_scripts(self, batch: list) -> None:
        from redis.exceptions import NoScriptError

        try:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for script, keys, args, _ in batch:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
            except self._errors as exc:
                results = [exc] * len(batch)
            for (script, keys, args, future), result in zip(batch, results):
                if isinstance(result, NoScriptError):  # Redis restarted: load it, run it again
                    try:
                        result = await script(keys=keys, args=args)
                    except self._errors as exc:
                        result = exc
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(StoreUnavailable(str(result)))
                else:
                    future.set_result(result)
        finally:
            self._next_script_batch()

    async def reserve(self, reservation_id: str, charges: Sequence[Charge], ttl: float) -> ReserveResult:
        keys = [self.prefix + c.key for c in charges]
        args: list = [len(charges), max(1, int(ttl * 1000))]
        for c in charges:
            args += [int(c.amount), -1 if c.limit is None else int(c.limit), int(c.expire_at * 1000)]
        result = await self._run_script("reserve", _RESERVE_LUA, [*keys, self.prefix + "res:" + reservation_id], args)
        ok, failed, *levels = (int(v) for v in result)
        return ReserveResult(bool(ok), levels, None if ok else failed - 1)

    async def _settle(self, reservation_id: str, actual: Mapping[str, int] | None) -> bool:
        args: list = ["release" if actual is None else "commit"]
        for key, amount in (actual or {}).items():
            args += [self.prefix + key, int(amount)]
        result = await self._run_script("settle", _SETTLE_LUA, [self.prefix + "res:" + reservation_id], args)
        return bool(int(result))

    async def commit(self, reservation_id: str, actual: Mapping[str, int]) -> bool:
        return await self._settle(reservation_id, actual)

    async def release(self, reservation_id: str) -> bool:
        return await self._settle(reservation_id, None)

    async def read_counters(self, keys: Sequence[str]) -> list[tuple[int, int]]:
        if not keys:
            return []
        full = []
        for k in keys:
            full += [self.prefix + k, self.prefix + k + HELD_SUFFIX]
        values = await self._do(self._redis.mget(full))
        ints = [int(v) if v is not None else 0 for v in values]
        return [(ints[i], ints[i + 1]) for i in range(0, len(ints), 2)]


# KEYS: n counters, then the reservation hash. ARGV: n, ttl_ms, then (amount, limit or -1,
# expire_at_ms) per counter. All or nothing; returns {1, 0, levels...} or {0, i, levels...}.
_RESERVE_LUA = """
local n = tonumber(ARGV[1])
local levels = {}
for i = 1, n do
  local amount = tonumber(ARGV[3 * i])
  local limit = tonumber(ARGV[3 * i + 1])
  local level = tonumber(redis.call('GET', KEYS[i]) or '0')
  levels[i] = level
  if limit >= 0 and level + amount > limit then
    return {0, i, unpack(levels)}
  end
end
local res = KEYS[n + 1]
for i = 1, n do
  local amount = tonumber(ARGV[3 * i])
  local expire_at = tonumber(ARGV[3 * i + 2])
  local held = KEYS[i] .. ':held'
  -- a counter's expiry is set when this reservation created it (its value is then the amount)
  if redis.call('INCRBY', KEYS[i], amount) == amount then redis.call('PEXPIREAT', KEYS[i], expire_at) end
  if redis.call('INCRBY', held, amount) == amount then redis.call('PEXPIREAT', held, expire_at) end
  redis.call('HINCRBY', res, KEYS[i], amount)
end
redis.call('PEXPIRE', res, tonumber(ARGV[2]))
return {1, 0, unpack(levels)}
"""

# KEYS[1]: the reservation hash. ARGV[1]: 'commit' or 'release'; then (counter key, real amount)
# pairs for commit (a reserved counter not named keeps its reserved amount). Once only: a
# reservation already settled (or expired) is left alone and 0 returned.
_SETTLE_LUA = """
local held = redis.call('HGETALL', KEYS[1])
if #held == 0 then return 0 end
local actual = {}
if ARGV[1] == 'commit' then
  for i = 2, #ARGV, 2 do actual[ARGV[i]] = tonumber(ARGV[i + 1]) end
end
for i = 1, #held, 2 do
  local key = held[i]
  local reserved = tonumber(held[i + 1])
  local final = 0
  if ARGV[1] == 'commit' then final = actual[key] or reserved end
  if final ~= reserved and redis.call('EXISTS', key) == 1 then
    redis.call('INCRBY', key, final - reserved)
  end
  local hk = key .. ':held'
  if redis.call('EXISTS', hk) == 1 then redis.call('DECRBY', hk, reserved) end
end
redis.call('DEL', KEYS[1])
return 1
"""


def open_store(config: StateConfig) -> Store:
    """The store the configuration asks for."""
    if config.redis_url:
        return RedisStore(config.redis_url, prefix=config.key_prefix)
    return MemoryStore(prefix=config.key_prefix)
