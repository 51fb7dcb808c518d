"""Budget leases: a worker reserves a block of budget in one store call and admits from it locally.

Without leases every admission is one atomic store operation (one Redis round trip: a wait on the
network and about 0.1 ms of the worker's CPU, which at 16 concurrent requests in one worker's loop
becomes a queue). With leases, a worker reserves a **block** - a few dozen requests' worth of every
counter a set of subjects touches - in that same atomic operation, and admits the next requests of
those subjects from the block in memory, with no store call at all. Each request still ends up
charged its real usage: when the block is closed, its reservation is reconciled to the sum of the
usage of the requests it admitted.

Why this never overspends: a block is an ordinary reservation in the store, so every other worker
and gateway sees it as reserved. What it costs is precision near a limit (what one worker holds is
not available to the others for a moment), so blocks are kept small and leasing steps aside where
precision matters:

* a block is at most ``fraction`` of the headroom (limit - spent - reserved, as the last store call
  saw it) of the tightest limited counter of each metric, and at most ``max_requests`` times the
  request that opens it; it is sized by demand: ``min_requests`` for subjects not seen before,
  ``max_requests`` after a block ran out (and then the next block is opened ahead of need, so
  admissions do not wait for the store), twice what the last one admitted otherwise, and none at
  all for sparse traffic (a block that admitted fewer than two) until it picks up again;
* no block is opened when it would hold fewer than ``min_requests`` such requests: near a limit, or
  under small limits, every request is reserved on its own, exactly as without leases (a block
  sized before the headroom was measured - the first of a set of subjects in a minute - and refused
  by the store falls back to that too);
* a block admits for ``seconds`` at most (so an admin override of a limit applies within that), then
  is retired; its unused part goes back to the store when the last request it admitted is settled;
* a worker that dies holding a block leaves it reserved until the reservation's TTL, when the store
  counts it as spent (the same rule as for a single request: over-counted, never under-counted).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from extproc.state.store import StoreUnavailable


class LeaseSettings(BaseModel):
    """How a worker leases budget blocks (the ``leases`` block of the ``budgets`` settings)."""

    model_config = ConfigDict(extra="forbid")

    enabled: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: on with a shared (Redis) store, off with the in-memory store")
    seconds: float = Field(1.0, gt=0, le=60, description="longest a block admits requests")
    fraction: float = Field(0.05, gt=0, le=0.5, description="largest share of a limit's headroom in one block")
    min_requests: int = Field(4, ge=2, description="no block smaller than this many requests' worth")
    max_requests: int = Field(64, ge=2, description="no block larger than this many requests' worth")

    @model_validator(mode="after")
    def _sizes(self) -> "LeaseSettings":
        if self.min_requests > self.max_requests:
            raise ValueError(f"min_requests ({self.min_requests}) is larger than max_requests ({self.max_requests})")
        return self


@dataclass(slots=True, eq=False)
class Lease:
    """A block reserved in the store under its own id, and what this worker did with it."""

    id: str
    subjects: tuple
    minute: int
    prepared: Any  # the ledger's plan of these subjects' counters (plan.metrics, limited)
    block: list[int]  # reserved in the store, per metric
    free: list[int]  # not handed out yet
    used: list[int]  # real usage of the requests settled so far
    levels: list[int]  # each counter's level before the block was reserved
    admit_until: float  # time.monotonic()
    expires: float  # time.monotonic() when the store gives the reservation up (its TTL)
    inflight: dict[str, list[int]] = field(default_factory=dict)  # request id -> what it took
    retired: bool = False
    closed: bool = False
    refilling: bool = False  # the next block is being opened
    hot: bool = False  # demand is high (its predecessor ran out): open the next one ahead of need
    admitted: int = 0


@dataclass(slots=True)
class _Demand:
    """How the last block of a set of subjects was used: sizes the next one."""

    admitted: int  # requests it admitted
    ran_out: bool  # it ran out of budget before its time was up
    direct: int = 0  # requests reserved on their own since (sparse traffic)
    direct_since: float = 0.0


@dataclass(slots=True)
class _Hint:
    """What the last store call for a set of subjects saw: its plan and the levels after it."""

    minute: int
    prepared: Any
    levels: list[int]


#: ``reserve(rid, subjects, vector, ttl, now) -> (prepared, ReserveResult)``: the ledger's own
#: guarded reservation of a plan (it re-plans when an admin override changed).
Reserver = Callable[[str, tuple, list[int], float, float], Awaitable[tuple[Any, Any]]]


class LeaseBook:
    """One worker's budget blocks, keyed by the set of subjects a request is charged to.

    :param settings: block sizes and lifetime.
    :param reserve: the ledger's reservation of a plan (see :data:`Reserver`).
    :param commit: ``commit_metrics(reservation id, per-metric amounts)`` of the store.
    :param prepare: ``prepare(subjects, now)``: the ledger's plan of these subjects' counters.
    """

    def __init__(self, settings: LeaseSettings, reserve: Reserver,
                 commit: Callable[[str, list[int]], Awaitable[bool]], prepare: Callable[[tuple, float], Any],
                 max_keys: int = 10_000):
        self.settings = settings
        self._reserve = reserve
        self._prepare = prepare
        self._commit = commit
        self.max_keys = max_keys
        self._active: dict[tuple, Lease] = {}
        self._next: dict[tuple, Lease] = {}  # opened ahead of need, admitting once the active one runs out
        self._demand: dict[tuple, _Demand] = {}
        self._hints: dict[tuple, _Hint] = {}
        self._opening: dict[tuple, asyncio.Future] = {}
        self._slices: dict[str, Lease] = {}
        self._retired: list[Lease] = []
        self._abandoned: list[tuple[str, int]] = []  # blocks whose opening was cancelled: released by maintain()
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()  # background openings (the loop holds tasks weakly)
        self._ttl: float | None = None
        self.opened = 0  # blocks reserved (store calls), for tests and metrics
        self.local_admissions = 0  # requests admitted from a block

    # admission --------------------------------------------------------------------------------
    def take(self, rid: str, subjects: tuple, vector: list[int], now: float):
        """Admit from this worker's block for ``subjects`` without a store call.

        :returns: the fullest limited counter's ratio (as the store would see it) when admitted,
            else None (no block, or it is too old, of another minute, or too empty).
        """
        lease = self._active.get(subjects)
        if lease is None:
            return None
        if not self._fits(lease, vector, now):
            # it ran out if it is still admitting yet too empty for this request; the block opened
            # ahead, if any, takes its place
            self._retire(lease, ran_out=self._timely(lease, now))
            lease = self._active.get(subjects)
            if lease is None or not self._fits(lease, vector, now):
                if lease is not None:
                    self._retire(lease)
                return None
        free = lease.free
        for m, v in enumerate(vector):
            free[m] -= v
        lease.inflight[rid] = vector
        lease.admitted += 1
        self._slices[rid] = lease
        self.local_admissions += 1
        if lease.hot:
            self._prefetch(lease, vector, now)
        return self._ratio(lease)

    @staticmethod
    def _timely(lease: Lease, now: float) -> bool:
        """Still admitting: the minute it was reserved for, within its ``seconds``."""
        return lease.minute == int(now // 60) and time.monotonic() < lease.admit_until

    @classmethod
    def _fits(cls, lease: Lease, vector: list[int], now: float) -> bool:
        return cls._timely(lease, now) and all(v <= f for v, f in zip(vector, lease.free))

    @staticmethod
    def _ratio(lease: Lease) -> float:
        ratio = 0.0
        metrics = lease.prepared.plan.metrics
        for i, limit in lease.prepared.limited:
            m = metrics[i]
            handed_out = lease.block[m] - lease.free[m]
            ratio = max(ratio, (lease.levels[i] + handed_out) / limit if limit else 1.0)
        return ratio

    async def open(self, rid: str, subjects: tuple, vector: list[int], ttl: float, now: float):
        """Reserve a new block for ``subjects`` and admit this request from it.

        :returns: as :meth:`take`; None when no block is worth opening here (the caller reserves
            the request on its own).
        """
        self._ttl = ttl
        await self._open_block(subjects, vector, ttl, now)  # (or share the one being opened)
        return self.take(rid, subjects, vector, now)

    async def _open_block(self, subjects: tuple, vector: list[int], ttl: float, now: float) -> Lease | None:
        """Reserve a block sized for requests like ``vector`` and make it the one admitting."""
        waiting = self._opening.get(subjects)
        if waiting is not None:  # one opening per set of subjects at a time
            await asyncio.shield(waiting)
            return self._active.get(subjects)
        minute = int(now // 60)
        hint = self._hints.get(subjects)
        if hint is None or hint.minute != minute:  # not measured yet: size the block by the limits alone
            prepared = self._prepare(subjects, now)
            hint = _Hint(minute, prepared, [0] * len(prepared.plan.keys))
        demand = self._demand.get(subjects)
        block = self._block(hint, vector, demand)
        if block is None:
            return None
        future = asyncio.get_running_loop().create_future()
        self._opening[subjects] = future
        lease_id = "lease-" + uuid.uuid4().hex
        try:
            prepared, result = await self._reserve(lease_id, subjects, block, ttl, now)
        except asyncio.CancelledError:  # the script may have run: give the block back later
            self._abandoned.append((lease_id, len(block)))
            raise
        finally:
            if self._opening.get(subjects) is future:
                del self._opening[subjects]
            future.set_result(None)
        if not result.ok:  # the headroom went meanwhile: reserve this request on its own
            self._hints.pop(subjects, None)
            return None
        self.opened += 1
        mono = time.monotonic()
        lease = Lease(lease_id, subjects, minute, prepared, block, list(block), [0] * len(block),
                      list(result.levels), mono + self.settings.seconds, mono + ttl,
                      hot=demand is not None and demand.ran_out)
        metrics = prepared.plan.metrics  # what the next block is sized by: the levels after this one
        self._hints[subjects] = _Hint(minute, prepared, [lvl + block[metrics[i]] for i, lvl in enumerate(result.levels)])
        if len(self._active) >= self.max_keys:
            for other in list(self._active.values()):
                self._retire(other)
        current = self._active.get(subjects)
        if current is not None and not current.retired and not current.closed:
            stale = self._next.get(subjects)
            if stale is not None:  # (cannot happen: one opening at a time; kept safe)
                stale.retired = True
                self._retired.append(stale)
            self._next[subjects] = lease  # admits when the active one runs out
        else:
            self._active[subjects] = lease
        return lease

    def _prefetch(self, lease: Lease, vector: list[int], now: float) -> None:
        """Open the next block in the background as soon as this (hot) block is in use or near its
        end, so that admissions do not wait for a store call when it runs out."""
        if lease.refilling or lease.subjects in self._opening or lease.subjects in self._next or self._ttl is None:
            return
        in_use = any(f < b for b, f in zip(lease.block, lease.free))
        if not in_use and time.monotonic() < lease.admit_until - self.settings.seconds / 4:
            return
        lease.refilling = True
        task = asyncio.get_running_loop().create_task(self._refill(lease.subjects, vector, self._ttl, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refill(self, subjects: tuple, vector: list[int], ttl: float, now: float) -> None:
        try:
            await self._open_block(subjects, vector, ttl, now)
        except StoreUnavailable:
            pass  # the next admission that finds no block opens one itself (or is reserved alone)

    def _block(self, hint: _Hint, vector: list[int], demand: _Demand | None) -> list[int] | None:
        """The block to reserve, per metric, or None when it would be too small to be worth it.

        Sized for ``min_requests`` requests like ``vector`` for a set of subjects not seen before,
        ``max_requests`` when the last block ran out, else twice what the last block admitted; None
        (reserve each request on its own) when the last block admitted fewer than two, until
        traffic picks up again.
        """
        s = self.settings
        if demand is None:  # a set of subjects seen for the first time: a small block
            requests = s.min_requests
        elif demand.ran_out:
            requests = s.max_requests
        elif demand.admitted < 2:
            return None
        else:
            requests = max(s.min_requests, min(s.max_requests, 2 * demand.admitted))
        metrics = hint.prepared.plan.metrics
        headroom: dict[int, int] = {}
        for i, limit in hint.prepared.limited:
            m = metrics[i]
            room = limit - hint.levels[i]
            headroom[m] = min(headroom.get(m, room), room)
        block = []
        for m, v in enumerate(vector):
            want = v * requests
            if m in headroom:
                want = min(want, int(headroom[m] * s.fraction))
                if v > 0 and want < v * s.min_requests:
                    return None
            block.append(max(want, 0))
        return block

    def learn(self, subjects: tuple, prepared, levels: list[int], vector: list[int], now: float) -> None:
        """What a store call of a request reserved on its own saw (levels before it): the headroom
        the next block is sized by. Enough such requests within ``seconds`` bring leasing back."""
        if len(self._hints) >= self.max_keys:
            self._hints.clear()
            self._demand.clear()
        metrics = prepared.plan.metrics
        after = [level + vector[metrics[i]] for i, level in enumerate(levels)]  # this request is reserved now
        self._hints[subjects] = _Hint(int(now // 60), prepared, after)
        demand = self._demand.get(subjects)
        if demand is not None and not demand.ran_out and demand.admitted < 2:
            mono = time.monotonic()
            if mono - demand.direct_since > self.settings.seconds:
                demand.direct, demand.direct_since = 0, mono
            demand.direct += 1
            if demand.direct >= self.settings.min_requests:
                del self._demand[subjects]  # busy again: lease

    # settling ---------------------------------------------------------------------------------
    def owns(self, rid: str) -> bool:
        """Whether ``rid`` was admitted from a block (so settling it is this book's business)."""
        return rid in self._slices

    def settle(self, rid: str, actual: list[int] | None) -> bool:
        """Record a block-admitted request's real usage (per metric; a negative entry keeps what it
        took; None: released, nothing used).

        :returns: True when its block is now retired with nothing in flight (ready to close).
        """
        lease = self._slices.pop(rid, None)
        if lease is None:
            return False
        took = lease.inflight.pop(rid, None)
        if took is None or lease.closed:
            return False
        used = lease.used
        if actual is not None:
            for m, a in enumerate(actual):
                used[m] += took[m] if a < 0 else a
        if not lease.retired:  # what it did not use can be handed out again
            free = lease.free
            for m, t in enumerate(took):
                free[m] += t - (0 if actual is None else (t if actual[m] < 0 else min(t, actual[m])))
        return lease.retired and not lease.inflight

    def _retire(self, lease: Lease, ran_out: bool = False) -> None:
        if lease.retired:
            return
        lease.retired = True
        if self._active.get(lease.subjects) is lease:
            if len(self._demand) >= self.max_keys:
                self._demand.clear()
            self._demand[lease.subjects] = _Demand(lease.admitted, ran_out)
            del self._active[lease.subjects]
            nxt = self._next.pop(lease.subjects, None)
            if nxt is not None:
                self._active[lease.subjects] = nxt
        elif self._next.get(lease.subjects) is lease:
            del self._next[lease.subjects]
        self._retired.append(lease)

    async def maintain(self, *, retire_all: bool = False, final: bool = False) -> int:
        """Retire blocks past their time and close retired ones nobody uses any more.

        Closing reconciles a block's reservation to the real usage of its requests (one store call
        each). ``retire_all``: retire every block now (what is idle is closed at once). ``final``
        (shutdown): close every block, a request still in flight charged what it took (never
        under-counted). A close the store refuses is tried again next time.

        :returns: how many blocks were closed.
        """
        if final or retire_all:  # blocks being opened ahead are retired too, once they are open
            if final:
                for task in list(self._tasks):
                    task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        async with self._lock:  # one at a time: a block is closed once
            now = time.monotonic()
            for lease in list(self._active.values()) + list(self._next.values()):
                if final or retire_all or now >= lease.admit_until:
                    self._retire(lease)
            abandoned, self._abandoned = self._abandoned, []
            for i, (lease_id, metrics) in enumerate(abandoned):
                try:
                    await self._commit(lease_id, [0] * metrics)  # nothing used: all given back
                except StoreUnavailable:
                    self._abandoned.extend(abandoned[i:])
                    break
            todo, self._retired = self._retired, []
            keep, closed = [], 0
            for lease in todo:
                if now >= lease.expires:  # the store counted it as spent already (orphaned)
                    self._forget(lease)
                    continue
                if lease.inflight and not final:
                    keep.append(lease)
                    continue
                amounts = list(lease.used)
                for took in lease.inflight.values():
                    for m, t in enumerate(took):
                        amounts[m] += t
                try:
                    await self._commit(lease.id, amounts)
                except StoreUnavailable:
                    keep.append(lease)
                    continue
                self._forget(lease)
                closed += 1
            self._retired = keep + self._retired  # (blocks retired while this one awaited)
            return closed

    def _forget(self, lease: Lease) -> None:
        lease.closed = True
        for rid in lease.inflight:
            self._slices.pop(rid, None)

    def holding(self) -> int:
        """Blocks open in this worker (admitting or draining)."""
        return len(self._active) + len(self._next) + len(self._retired)
