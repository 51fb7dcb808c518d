"""Budget reservations in a :class:`~extproc.state.memory.MemoryStore` (one worker's own).

Each operation runs without an ``await``: one step of the event loop, so atomic with respect to
every other coroutine of the worker (the Redis backend gets the same from a Lua script).
"""

from __future__ import annotations

import heapq
import time
from typing import Mapping, Sequence

from extproc.state.memory import MemoryStore
from extproc.state.store import StoreUnavailable
from extproc_plugins.budgets.reservations import HELD_SUFFIX, Charge, ReservePlan, ReserveResult


class MemoryReservations:
    """Counters and reservations kept beside a memory store, outside its LRU (never evicted by
    cache pressure), bounded by their expiry and by ``max_counters``."""

    def __init__(self, store: MemoryStore, max_counters: int = 1_000_000):
        self.store = store
        self.max_counters = max_counters
        self._counters: dict[str, list] = {}  # key -> [value, expire_at (unix seconds)]
        # id -> ({key: amount}, {key: metric index}, expires)
        self._reservations: dict[str, tuple[dict[str, int], dict[str, int], float]] = {}
        self._expiry: list[tuple[float, int, str, str]] = []  # heap of (when, seq, kind, key)
        self._seq = 0
        store.on_close(self._forget)

    def holdings(self) -> dict[str, int]:
        """What it keeps, for memory diagnostics (``extproc.observability.memdiag``)."""
        return {"counters": len(self._counters), "max_counters": self.max_counters,
                "reservations": len(self._reservations), "expiry_heap": len(self._expiry)}

    def _forget(self) -> None:
        self._counters.clear()
        self._reservations.clear()
        self._expiry.clear()

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
            current = self.store.records_now(plan.guards)
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
        p = self.store.prefix
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
        item = self._reservations.pop(self.store.prefix + "res:" + reservation_id, None)
        if item is None:
            return False
        if item[2] <= now:  # too late: it was given up as orphaned
            self._orphaned(item[0], now)
            return False
        held, which, _ = item
        plen = len(self.store.prefix)
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
        p = self.store.prefix
        return [(self._counter(p + k, now), self._counter(p + k + HELD_SUFFIX, now)) for k in keys]
