"""Budget reservations: atomic check-and-charge over several counters, on the gateway's store.

The budget *policy* (limits, windows, subjects, leases) is in :mod:`extproc_plugins.budgets.ledger`;
this package is the one operation it needs from shared state, with the same semantics on each
store (Redis: one Lua script per operation, :mod:`.redis_backend`; memory: the same logic in one
synchronous step of the event loop, :mod:`.memory`). :func:`reservations_for` picks the one for
the gateway's store.

* :meth:`ReservationStore.reserve_plan` checks every counter of a :class:`ReservePlan` against its
  limit and, only if all fit, charges them all and records the reservation (what it charged
  where, and for which metric), or charges nothing. A plan may also name *guarded records*
  (budget settings) with the values the caller planned with: if one changed, nothing is charged
  and the current values come back (:attr:`ReserveResult.stale`), so limits set elsewhere apply at
  once, in the same round trip;
* :meth:`~ReservationStore.commit_metrics` replaces the reserved amounts by the real ones per
  metric (reconcile), once; :meth:`~ReservationStore.commit` does the same per counter;
* :meth:`~ReservationStore.release` takes the reserved amounts back (aborted or failed requests), once.

:meth:`~ReservationStore.reserve` (a list of :class:`Charge`) is the same operation without a
prepared plan.

Each counter ``K`` holds spent + reserved; a companion ``K:held`` holds the reserved part, so
``K - K:held`` is what was really spent. A reservation not settled within its TTL (its gateway
crashed) is *orphaned*: a sweeper (memory: on expiry; Redis: every ``sweep_every``-th admission
looks at the index of reservations by due time) turns its worst case from reserved into spent,
so nothing stays "reserved" forever and nothing is under-counted. Counters expire when their
window is over. In memory they live outside the cache's LRU (never evicted by cache pressure),
bounded by expiry and by a count cap (past it, new ones raise
:class:`~extproc.state.store.StoreUnavailable`: refusing is safer than forgetting spend).

On a Redis Cluster one script's keys must share a hash slot: the ledger's counters carry their
tenant's hash tag (``bud:{tenant}:...``; a request's subjects - tenant, workflow, API key - are
all the tenant's), and :mod:`.redis_backend` puts the reservation record and the due index under
the same tag (``res:{tenant}:<id>``, ``res:{tenant}:due``). Orphans are then swept per tenant, by
that tenant's next admissions.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

from extproc.state.memory import MemoryStore
from extproc.state.redis_store import RedisStore
from extproc.state.store import Store

HELD_SUFFIX = ":held"


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
    encoded: dict = field(default_factory=dict)  # the backend's own pre-encoding of the constant parts


@dataclass(slots=True)
class ReserveResult:
    """What a reservation did.

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


class ReservationStore(Protocol):
    """The reservation operations budgets use; every method may raise ``StoreUnavailable``."""

    async def reserve(self, reservation_id: str, charges: Sequence[Charge], ttl: float) -> ReserveResult: ...
    async def reserve_plan(self, reservation_id: str, plan: ReservePlan, amounts: Sequence[int],
                           ttl: float) -> ReserveResult: ...
    async def commit(self, reservation_id: str, actual: Mapping[str, int]) -> bool: ...
    async def commit_metrics(self, reservation_id: str, actual: Sequence[int]) -> bool: ...
    async def release(self, reservation_id: str) -> bool: ...
    async def read_counters(self, keys: Sequence[str]) -> list[tuple[int, int]]: ...


_by_store: "weakref.WeakKeyDictionary[Store, ReservationStore]" = weakref.WeakKeyDictionary()


def reservations_for(store: Store) -> ReservationStore:
    """The reservations on ``store`` (one per store: a memory store's counters live in it)."""
    found = _by_store.get(store)
    if found is not None:
        return found
    if isinstance(store, MemoryStore):
        from extproc_plugins.budgets.reservations.memory import MemoryReservations

        found = MemoryReservations(store)
    elif isinstance(store, RedisStore):
        from extproc_plugins.budgets.reservations.redis_backend import RedisReservations

        found = RedisReservations(store)
    else:
        raise TypeError(f"budgets: no reservations for a {type(store).__name__} (memory or Redis stores)")
    _by_store[store] = found
    return found
