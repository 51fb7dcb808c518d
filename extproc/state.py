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

* :meth:`reserve_plan` checks every counter of a :class:`ReservePlan` against its limit and, only
  if all fit, charges them all and records the reservation (what it charged where, and for which
  metric), or charges nothing. A plan may also name *guarded records* (budget settings) with the
  values the caller planned with: if one changed, nothing is charged and the current values come
  back (:attr:`ReserveResult.stale`), so limits set elsewhere apply at once, in the same round trip;
* :meth:`commit_metrics` replaces the reserved amounts by the real ones per metric (reconcile), once;
  :meth:`commit` does the same per counter;
* :meth:`release` takes the reserved amounts back (aborted or failed requests), once.

:meth:`reserve` (a list of :class:`Charge`) is the same operation without a prepared plan.

Each counter ``K`` holds spent + reserved; a companion ``K:held`` holds the reserved part, so
``K - K:held`` is what was really spent. A reservation not settled within its TTL (its gateway
crashed) is *orphaned*: a sweeper (memory: on expiry; Redis: every ``sweep_every``-th admission
looks at the index of reservations by due time) turns its worst case from reserved into spent, so
nothing stays "reserved" forever and nothing is under-counted. Counters expire when their window is over. Budget
counters and records (API keys, budget settings) are never evicted by cache pressure: in memory
they live outside the LRU, bounded by expiry and by a count cap (past it, new ones raise
:class:`StoreUnavailable`: refusing is safer than forgetting spend).

The memory store is **per worker process**: with several workers (or gateways) each enforces its
own copy of every limit. Budgets that must hold across workers and gateways need Redis.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
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
    async def reserve_plan(self, reservation_id: str, plan: "ReservePlan", amounts: Sequence[int],
                           ttl: float) -> "ReserveResult": ...
    async def commit(self, reservation_id: str, actual: Mapping[str, int]) -> bool: ...
    async def commit_metrics(self, reservation_id: str, actual: Sequence[int]) -> bool: ...
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


@dataclass(slots=True, eq=False)
class ReservePlan:
    """Every counter one kind of reservation charges, prepared once and reused for many requests.

    :param keys: the counters (the store adds its prefix).
    :param metrics: for each counter, the index of its amount in the amounts of a reservation.
    :param limits: for each counter, its limit (``None``: counted without limit).
    :param expire_at: for each counter, the Unix time (seconds) after which it may disappear.
    :param guards: record keys (budget settings) the caller planned with...
    :param expected: ...and the values it saw (``None``: absent).
    """

    keys: list[str]
    metrics: list[int]
    limits: list[int | None]
    expire_at: list[float]
    guards: list[str] = field(default_factory=list)
    expected: list[bytes | None] = field(default_factory=list)
    encoded: dict = field(default_factory=dict)  # the store's own pre-encoding of the constant parts


@dataclass(slots=True)
class ReserveResult:
    """What :meth:`Store.reserve` did.

    :param ok: True when every counter fitted and all were charged; False when none was.
    :param levels: each counter's value (spent + reserved) *before* this reservation, in the
        order given (when refused: up to and including the one that did not fit).
    :param failed: index of the first charge that did not fit, or None.
    :param stale: when a guarded record no longer held the expected value: every guarded
        record's current value (nothing was charged; plan again with these and retry).
    """

    ok: bool
    levels: list[int] = field(default_factory=list)
    failed: int | None = None
    stale: list[bytes | None] | None = None


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
        # id -> ({key: amount}, {key: metric index}, expires)
        self._reservations: dict[str, tuple[dict[str, int], dict[str, int], float]] = {}
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
                if item is not None and item[2] <= now:
                    del self._reservations[key]
                    self._orphaned(item[0], now)

    def _orphaned(self, held: Mapping[str, int], now: float) -> None:
        """A reservation never settled (its gateway died): its worst case stays charged, as spent."""
        for key, reserved in held.items():
            hold = self._counters.get(key + HELD_SUFFIX)
            if hold is not None and hold[1] > now:
                hold[0] -= reserved

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
        return self._reserve(reservation_id, [c.key for c in charges], [c.amount for c in charges],
                             [c.limit for c in charges], [c.expire_at for c in charges], None, ttl)

    async def reserve_plan(self, reservation_id: str, plan: ReservePlan, amounts: Sequence[int],
                           ttl: float) -> ReserveResult:
        if plan.guards:
            current = [self._records.get(self.prefix + k) for k in plan.guards]
            if current != list(plan.expected):
                return ReserveResult(False, stale=current)
        return self._reserve(reservation_id, plan.keys, [amounts[m] for m in plan.metrics], plan.limits,
                             plan.expire_at, plan.metrics, ttl)

    def _reserve(self, reservation_id: str, keys: Sequence[str], amounts: Sequence[int],
                 limits: Sequence[int | None], expire_at: Sequence[float], metrics: Sequence[int] | None,
                 ttl: float) -> ReserveResult:
        # No await inside: atomic with respect to every other coroutine of this worker.
        now = time.time()
        self._sweep(now)
        p = self.prefix
        levels: list[int] = []
        for i, (key, amount, limit) in enumerate(zip(keys, amounts, limits)):
            level = self._counter(p + key, now)
            levels.append(level)
            if limit is not None and level + amount > limit:
                return ReserveResult(False, levels, i)
        new = sum(1 for k in keys if p + k not in self._counters) * 2
        if len(self._counters) + new > self.max_counters:
            raise StoreUnavailable(f"memory store holds its maximum of {self.max_counters} budget counters")
        held: dict[str, int] = {}
        which: dict[str, int] = {}
        for i, (key, amount, expires) in enumerate(zip(keys, amounts, expire_at)):
            key = p + key
            self._add(key, amount, expires, now)
            self._add(key + HELD_SUFFIX, amount, expires, now)
            held[key] = held.get(key, 0) + amount
            which[key] = metrics[i] if metrics is not None else i
        rid = p + "res:" + reservation_id
        self._reservations[rid] = (held, which, now + ttl)
        self._schedule(now + ttl, "r", rid)
        return ReserveResult(True, levels, None)

    def _settle(self, reservation_id: str, actual: Mapping[str, int] | None = None,
                per_metric: Sequence[int] | None = None, release: bool = False) -> bool:
        now = time.time()
        item = self._reservations.pop(self.prefix + "res:" + reservation_id, None)
        if item is None:
            return False
        if item[2] <= now:  # too late: it was given up as orphaned
            self._orphaned(item[0], now)
            return False
        held, which, _ = item
        plen = len(self.prefix)
        for key, reserved in held.items():
            if release:
                final = 0
            elif per_metric is not None:
                final = per_metric[which[key]]
                final = reserved if final < 0 else final
            else:
                final = actual.get(key[plen:], reserved)
            counter = self._counters.get(key)
            if counter is not None and counter[1] > now and final != reserved:
                counter[0] += final - reserved
            hold = self._counters.get(key + HELD_SUFFIX)
            if hold is not None and hold[1] > now:
                hold[0] -= reserved
        return True

    async def commit(self, reservation_id: str, actual: Mapping[str, int]) -> bool:
        return self._settle(reservation_id, actual)

    async def commit_metrics(self, reservation_id: str, actual: Sequence[int]) -> bool:
        """Reconcile to the real amount per metric (indexes as in the plan; negative: keep the reserved)."""
        return self._settle(reservation_id, per_metric=actual)

    async def release(self, reservation_id: str) -> bool:
        return self._settle(reservation_id, release=True)

    async def read_counters(self, keys: Sequence[str]) -> list[tuple[int, int]]:
        now = time.time()
        p = self.prefix
        return [(self._counter(p + k, now), self._counter(p + k + HELD_SUFFIX, now)) for k in keys]


_store_ids = itertools.count()


class _Lane:
    """A connection for reservation scripts and its auto-pipeline: the batch waiting for the wire."""

    __slots__ = ("conn", "busy", "batch", "task")

    def __init__(self):
        self.conn = None
        self.task = None
        self.busy = False
        self.batch: list = []


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
        # Admissions and settlements each have a connection of their own, so a reconcile being
        # written never makes the next request's admission wait for it.
        self._admit_lane, self._settle_lane = _Lane(), _Lane()
        self._token = next(_store_ids)  # names this store's pre-encoded plans
        self._due_key = _bulk((prefix + "res:due").encode())
        self.sweep_every = 32  # admissions between two looks for orphaned reservations
        self._admissions = 0

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
        for lane in (self._admit_lane, self._settle_lane):
            if lane.conn is not None:
                await lane.conn.disconnect()
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

    # reservations: one Lua script per operation, run with EVALSHA (a script Redis forgot, e.g.
    # after a restart, is loaded and the call sent again). Plain Redis, no modules; not Redis
    # Cluster (keys of several tenants). Under concurrency the client's per-command CPU, not Redis,
    # is the cost, so these calls skip redis-py's command layer: each is packed straight into the
    # RESP protocol (the constant part of a plan once), and they go out on a connection of their
    # own (one for admissions, one for settlements); calls made while one batch is on the wire wait
    # and go out together as the next one (auto-pipelining: one write and one read for many calls;
    # each script still runs atomically).
    async def _call_script(self, lane: "_Lane", name: str, packed: bytes):
        """Send one packed EVALSHA on ``lane``; while a batch is on its wire, wait and go out with the next."""
        import asyncio

        if lane.busy:
            future = asyncio.get_running_loop().create_future()
            lane.batch.append((name, packed, future))
            return await future
        lane.busy = True
        try:
            result = (await self._send_scripts(lane, [(name, packed, None)]))[0]
        finally:
            self._next_script_batch(lane)
        if isinstance(result, BaseException):
            raise StoreUnavailable(str(result)) from result
        return result

    def _next_script_batch(self, lane: "_Lane") -> None:
        import asyncio

        if lane.batch:
            batch, lane.batch = lane.batch, []
            # stays busy; the lane keeps the task (the loop holds tasks only weakly)
            lane.task = asyncio.get_running_loop().create_task(self._flush_scripts(lane, batch))
        else:
            lane.busy = False

    async def _flush_scripts(self, lane: "_Lane", batch: list) -> None:
        try:
            results = await self._send_scripts(lane, batch)
            for (_, _, future), result in zip(batch, results):
                if future.done():  # its caller went away
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(StoreUnavailable(str(result)))
                else:
                    future.set_result(result)
        except BaseException as exc:  # noqa: BLE001 - never leave a caller waiting
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(f"batch failed: {exc!r}"))
            raise
        finally:
            self._next_script_batch(lane)

    async def _send_scripts(self, lane: "_Lane", batch: list) -> list:
        """Write the packed calls at once and read every answer (a value or the exception)."""
        from redis.exceptions import NoScriptError, ResponseError

        if lane.conn is None:
            lane.conn = self._redis.connection_pool.make_connection()
        conn = lane.conn
        results: list = []
        try:
            await conn.send_packed_command(b"".join(packed for _, packed, _ in batch), check_health=False)
            for _ in batch:
                try:
                    results.append(await conn.read_response())
                except ResponseError as exc:
                    results.append(exc)
        except self._errors as exc:  # the connection broke: the calls not answered fail
            await conn.disconnect(nowait=True)
            results += [exc] * (len(batch) - len(results))
            return results
        again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if again:  # Redis restarted (or SCRIPT FLUSH): load the scripts and send those calls again
            try:
                for name in {batch[i][0] for i in again}:
                    await self._redis.script_load(_SCRIPTS[name])
                retried = await self._send_scripts(lane, [batch[i] for i in again])
            except self._errors as exc:
                retried = [exc] * len(again)
            for i, r in zip(again, retried):
                results[i] = r
        return results

    def _packed_plan(self, plan: ReservePlan) -> tuple[bytes, int]:
        """The constant head of a plan's EVALSHA (command, keys but the reservation's, constant
        arguments) and the number of RESP array items it holds."""
        cached = plan.encoded.get(self._token)
        if cached is not None:
            return cached
        p = self.prefix
        n, m = len(plan.keys), len(plan.guards)
        keys = [(p + k).encode() for k in plan.keys] + [(p + k).encode() for k in plan.guards]
        args = [str(n).encode(), str(m).encode(),
                " ".join(str(i) for i in plan.metrics).encode(),
                " ".join("-1" if x is None else str(int(x)) for x in plan.limits).encode(),
                " ".join(str(int(e * 1000)) for e in plan.expire_at).encode(),
                *[b"0" if v is None else b"1" + bytes(v) for v in plan.expected]]
        # EVALSHA sha numkeys, keys (+ reservation, due index), args (+ ttl, amounts, sweep)
        items = 3 + len(keys) + 2 + len(args) + 3
        head = b"".join([b"*%d\r\n" % items, _bulk(b"EVALSHA"), _bulk(_SHAS["reserve"]),
                         _bulk(str(len(keys) + 2).encode()), *map(_bulk, keys)])
        tail = b"".join(map(_bulk, args))
        cached = plan.encoded[self._token] = (head, tail)
        return cached

    async def reserve_plan(self, reservation_id: str, plan: ReservePlan, amounts: Sequence[int],
                           ttl: float) -> ReserveResult:
        head, tail = self._packed_plan(plan)
        self._admissions += 1
        sweep = b"16" if self._admissions % self.sweep_every == 0 else b"0"
        packed = b"".join((head, _bulk((self.prefix + "res:" + reservation_id).encode()), self._due_key, tail,
                           _bulk(b"%d" % max(1, int(ttl * 1000))),
                           _bulk(" ".join(str(int(a)) for a in amounts).encode()), _bulk(sweep)))
        result = await self._call_script(self._admit_lane, "reserve", packed)
        status, failed, *rest = result
        if status == 2:
            return ReserveResult(False, stale=[None if v == b"0" else bytes(v[1:]) for v in rest])
        return ReserveResult(bool(status), [int(v) for v in rest], None if status else int(failed) - 1)

    async def reserve(self, reservation_id: str, charges: Sequence[Charge], ttl: float) -> ReserveResult:
        plan = ReservePlan([c.key for c in charges], list(range(len(charges))), [c.limit for c in charges],
                           [c.expire_at for c in charges])
        return await self.reserve_plan(reservation_id, plan, [c.amount for c in charges], ttl)

    async def _settle(self, reservation_id: str, mode: bytes, args: Sequence[bytes] = ()) -> bool:
        packed = b"".join((b"*%d\r\n" % (6 + len(args)), _bulk(b"EVALSHA"), _bulk(_SHAS["settle"]), _bulk(b"2"),
                           _bulk((self.prefix + "res:" + reservation_id).encode()), self._due_key, _bulk(mode),
                           *map(_bulk, args)))
        return bool(int(await self._call_script(self._settle_lane, "settle", packed)))

    async def commit(self, reservation_id: str, actual: Mapping[str, int]) -> bool:
        args: list[bytes] = []
        for key, amount in actual.items():
            args += [(self.prefix + key).encode(), b"%d" % int(amount)]
        return await self._settle(reservation_id, b"key", args)

    async def commit_metrics(self, reservation_id: str, actual: Sequence[int]) -> bool:
        """Reconcile to the real amount per metric (indexes as in the plan; negative: keep the reserved)."""
        return await self._settle(reservation_id, b"metric", [" ".join(str(int(a)) for a in actual).encode()])

    async def release(self, reservation_id: str) -> bool:
        return await self._settle(reservation_id, b"release")

    async def read_counters(self, keys: Sequence[str]) -> list[tuple[int, int]]:
        if not keys:
            return []
        full = []
        for k in keys:
            full += [self.prefix + k, self.prefix + k + HELD_SUFFIX]
        values = await self._do(self._redis.mget(full))
        ints = [int(v) if v is not None else 0 for v in values]
        return [(ints[i], ints[i + 1]) for i in range(0, len(ints), 2)]


# A reservation record is one string: its metric indexes, its amounts (space-separated), then its
# counters, a line each. The index of reservations by due time (a sorted set) holds the reservation
# key and its record, so an orphan can be swept after its record expired.
_LUA_RECORDS = """
local function parse(record)
  local lines = {}
  for line in string.gmatch(record, '[^\\n]+') do lines[#lines + 1] = line end
  local metric, reserved, keys = {}, {}, {}
  for w in string.gmatch(lines[1] or '', '%S+') do metric[#metric + 1] = tonumber(w) end
  for w in string.gmatch(lines[2] or '', '%S+') do reserved[#reserved + 1] = tonumber(w) end
  for i = 3, #lines do keys[#keys + 1] = lines[i] end
  return metric, reserved, keys
end
"""

# KEYS: n counters, m guarded records, the reservation record, the due index. ARGV: n, m, each
# counter's metric index, limit (-1: none) and expiry (Unix ms) as space-separated lists, the m
# expected record values ('0': absent, '1' .. value), the reservation's TTL in ms, the amount per
# metric (space-separated), how many orphans to sweep first (0: none). A guarded record that
# changed: nothing charged, returns {2, j, current values...}. Else all or nothing: {1, 0,
# levels...} or {0, i, levels...}. Few redis.call()s (one MGET, two INCRBYs a counter, SET, ZADD):
# their count is the script's cost.
_RESERVE_LUA = _LUA_RECORDS + """
if redis.replicate_commands then redis.replicate_commands() end  -- TIME before writes (Redis < 5)
local n = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local res, due = KEYS[n + m + 1], KEYS[n + m + 2]
local sweep = tonumber(ARGV[8 + m])
if sweep > 0 then
  -- orphans (never settled within their TTL): their worst case stays charged, as spent
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, sweep)) do
    local cut = string.find(member, '\\n', 1, true)
    if redis.call('EXISTS', string.sub(member, 1, cut - 1)) == 0 then
      local _, reserved, keys = parse(string.sub(member, cut + 1))
      for i = 1, #keys do
        local hk = keys[i] .. ':held'
        if redis.call('EXISTS', hk) == 1 then redis.call('DECRBY', hk, reserved[i]) end
      end
    end
    redis.call('ZREM', due, member)
  end
end
if m > 0 then
  local current = redis.call('MGET', unpack(KEYS, n + 1, n + m))
  for j = 1, m do
    if (current[j] and ('1' .. current[j]) or '0') ~= ARGV[5 + j] then
      local out = {2, j}
      for k = 1, m do out[2 + k] = current[k] and ('1' .. current[k]) or '0' end
      return out
    end
  end
end
local function words(s)
  local t = {}
  for w in string.gmatch(s, '%S+') do t[#t + 1] = w end
  return t
end
local metric, limit, expire = words(ARGV[3]), words(ARGV[4]), words(ARGV[5])
local per_metric = words(ARGV[7 + m])
local levels, amounts = {}, {}
if n > 0 then
  local current = redis.call('MGET', unpack(KEYS, 1, n))
  for i = 1, n do
    local a = per_metric[tonumber(metric[i]) + 1]
    local level = tonumber(current[i] or '0')
    local lim = tonumber(limit[i])
    amounts[i] = a
    levels[i] = level
    if lim >= 0 and level + tonumber(a) > lim then
      return {0, i, unpack(levels)}
    end
  end
end
for i = 1, n do
  local a = amounts[i]
  local amount = tonumber(a)
  local held = KEYS[i] .. ':held'
  -- a counter's expiry is set when this reservation created it (its value is then the amount)
  if redis.call('INCRBY', KEYS[i], a) == amount then redis.call('PEXPIREAT', KEYS[i], expire[i]) end
  if redis.call('INCRBY', held, a) == amount then redis.call('PEXPIREAT', held, expire[i]) end
end
if n > 0 then
  local ttl = tonumber(ARGV[6 + m])
  local record = ARGV[3] .. '\\n' .. table.concat(amounts, ' ') .. '\\n' .. table.concat(KEYS, '\\n', 1, n)
  redis.call('SET', res, record, 'PX', ttl)
  local t = redis.call('TIME')
  redis.call('ZADD', due, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl, res .. '\\n' .. record)
end
return {1, 0, unpack(levels)}
"""

# KEYS[1]: the reservation record; KEYS[2]: the due index. ARGV[1]: 'release'; or 'metric' and the
# real amount per metric (space-separated; negative: keep the reserved amount); or 'key' and
# (counter key, real amount) pairs (a reserved counter not named keeps its reserved amount). Once
# only: a reservation already settled (or expired: orphaned) is left alone and 0 returned. A
# counter whose window is over (gone) is not brought back.
_SETTLE_LUA = _LUA_RECORDS + """
local record = redis.call('GET', KEYS[1])
if not record then return 0 end
local metric, reserved, keys = parse(record)
local n = #keys
local mode = ARGV[1]
local actual = {}
if mode == 'metric' then
  local j = 0
  for w in string.gmatch(ARGV[2], '%S+') do actual[j] = tonumber(w); j = j + 1 end
elseif mode == 'key' then
  for i = 2, #ARGV, 2 do actual[ARGV[i]] = tonumber(ARGV[i + 1]) end
end
if n > 0 then
  local names = {}
  for i = 1, n do
    names[2 * i - 1] = keys[i]
    names[2 * i] = keys[i] .. ':held'
  end
  local current = redis.call('MGET', unpack(names))
  for i = 1, n do
    local final = 0
    if mode == 'metric' then
      final = actual[metric[i]]
      if final == nil or final < 0 then final = reserved[i] end
    elseif mode == 'key' then
      final = actual[keys[i]] or reserved[i]
    end
    if final ~= reserved[i] and current[2 * i - 1] then redis.call('INCRBY', keys[i], final - reserved[i]) end
    if current[2 * i] then redis.call('DECRBY', names[2 * i], reserved[i]) end
  end
  redis.call('ZREM', KEYS[2], KEYS[1] .. '\\n' .. record)
end
redis.call('DEL', KEYS[1])
return 1
"""

_SCRIPTS = {"reserve": _RESERVE_LUA, "settle": _SETTLE_LUA}
_SHAS = {name: hashlib.sha1(source.encode()).hexdigest().encode() for name, source in _SCRIPTS.items()}


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def open_store(config: StateConfig) -> Store:
    """The store the configuration asks for."""
    if config.redis_url:
        return RedisStore(config.redis_url, prefix=config.key_prefix)
    return MemoryStore(prefix=config.key_prefix)
