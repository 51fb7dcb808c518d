"""Budgets and rate limits on the shared store: limits, windows, counters, reservations, spend.

Shared by the ``budgets`` policy (admission and reconciliation) and the admin API (set budgets,
read spend). Three **metrics** (``requests``, ``tokens``, ``usd``) over four **windows**
(``minute``, ``hour``, ``day``, ``month``) for three **scopes** of subject:

* ``tenant``: the tenant id (``ctx.tenant``);
* ``workflow``: ``<tenant>/<workflow>`` (workflows belong to a tenant);
* ``api_key``: the key id (``ctx.api_key_id``).

Windows are fixed and aligned in UTC (this minute, this hour, today, this calendar month), so a
refusal can say exactly when the window resets (``Retry-After``). One counter per subject, metric,
window and bucket; every counter a request touches is reserved in one atomic store operation
(:meth:`ReservationStore.reserve_plan <extproc_plugins.budgets.reservations.ReservationStore.reserve_plan>`, one Lua script and one round
trip on Redis): either all fit, or none is charged. USD is counted in integer nano-dollars, so sums
are exact.

A subject's limits: an override set through the admin API (a store record) if any, else the
configuration's own entry for it, else the configuration's default for its scope. Admission does
not read the overrides first: the plan (counters and limits of a set of subjects, prepared once a
minute) carries the override records it was made with, the reservation script checks them, and if
one changed it charges nothing and returns the current ones, which are planned with at once. So an
override applies to the next admission everywhere, and a request costs one round trip.
"""

from __future__ import annotations

import calendar
import functools
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Literal, Mapping
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from extproc_plugins.budgets.leases import LeaseBook, LeaseSettings
from extproc_plugins.budgets.reservations import ReservationStore, ReservePlan, reservations_for
from extproc.state.store import Store, StoreUnavailable

METRICS = ("requests", "tokens", "usd")
WINDOWS = ("minute", "hour", "day", "month")
SCOPES = ("tenant", "workflow", "api_key")
METRIC_INDEX = {m: i for i, m in enumerate(METRICS)}
NANO = 1_000_000_000  # nano-USD per USD

Scope = Literal["tenant", "workflow", "api_key"]
LIMIT_FIELDS = tuple(f"{m}_per_{w}" for m in METRICS for w in WINDOWS)


class Limits(BaseModel):
    """A subject's limits; every field optional (``None``: no limit on that metric and window)."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=0)
    requests_per_hour: int | None = Field(None, ge=0)
    requests_per_day: int | None = Field(None, ge=0)
    requests_per_month: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    tokens_per_hour: int | None = Field(None, ge=0)
    tokens_per_day: int | None = Field(None, ge=0)
    tokens_per_month: int | None = Field(None, ge=0)
    usd_per_minute: float | None = Field(None, ge=0)
    usd_per_hour: float | None = Field(None, ge=0)
    usd_per_day: float | None = Field(None, ge=0)
    usd_per_month: float | None = Field(None, ge=0)

    def limit(self, metric: str, window: str) -> int | None:
        """The limit in counter units (nano-USD for ``usd``), or None."""
        value = getattr(self, f"{metric}_per_{window}")
        if value is None:
            return None
        return int(round(value * NANO)) if metric == "usd" else int(value)

    def compact(self) -> dict:
        return self.model_dump(exclude_none=True)


class BudgetTables(BaseModel):
    """The limits part of the ``budgets`` plugin's settings (also read by the admin API)."""

    model_config = ConfigDict(extra="forbid")

    defaults: dict[Scope, Limits] = Field(default_factory=dict,
                                          description="limits of every subject of a scope without its own")
    tenants: dict[str, Limits] = Field(default_factory=dict)
    workflows: dict[str, Limits] = Field(default_factory=dict, description="keyed '<tenant>/<workflow>'")
    api_keys: dict[str, Limits] = Field(default_factory=dict, description="keyed by key id")
    track: dict[Scope, list[Literal["minute", "hour", "day", "month"]]] = Field(
        default_factory=lambda: {"tenant": ["day", "month"]},
        description="windows counted even without a limit, so their spend can be read")

    @classmethod
    def from_plugin_settings(cls, settings: dict) -> "BudgetTables":
        """The tables out of a ``budgets`` plugin entry's settings (other keys ignored)."""
        return cls.model_validate({k: v for k, v in settings.items() if k in cls.model_fields})

    def configured(self) -> dict[tuple[str, str], Limits]:
        out = {}
        for scope, table in (("tenant", self.tenants), ("workflow", self.workflows), ("api_key", self.api_keys)):
            for subject, limits in table.items():
                out[(scope, subject)] = limits
        return out


def usd_to_units(usd: float) -> int:
    return int(round(usd * NANO))


def units_to_usd(units: int) -> float:
    return units / NANO


def window_bounds(window: str, now: float) -> tuple[str, float, float]:
    """``(bucket id, start, end)`` of the window containing ``now`` (Unix seconds, UTC)."""
    if window == "minute":
        b = int(now // 60)
        return str(b), b * 60.0, b * 60.0 + 60
    if window == "hour":
        b = int(now // 3600)
        return str(b), b * 3600.0, b * 3600.0 + 3600
    if window == "day":
        b = int(now // 86400)
        return str(b), b * 86400.0, b * 86400.0 + 86400
    if window == "month":
        t = datetime.fromtimestamp(now, timezone.utc)
        start = calendar.timegm((t.year, t.month, 1, 0, 0, 0))
        year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
        end = calendar.timegm((year, month, 1, 0, 0, 0))
        return f"{t.year:04d}{t.month:02d}", float(start), float(end)
    raise ValueError(f"unknown window {window!r}")


@functools.lru_cache(maxsize=65536)
def _quoted(subject: str) -> str:
    return quote(subject, safe="")


def counter_key(scope: str, subject: str, metric: str, window: str, bucket: str, tag: str | None = None) -> str:
    """``bud:{<tag>}:<scope>:<subject>:<metric>:<window>:<bucket>``; the tag (the tenant, see
    :meth:`Subject.tag`) in braces is a Redis Cluster hash tag: every counter one request
    reserves hashes to one slot, so one script can check and charge them all."""
    return f"bud:{{{_quoted(subject if tag is None else tag)}}}:{scope}:{_quoted(subject)}:{metric}:{window}:{bucket}"


_bounds_cache: tuple[int, dict] = (-1, {})


def all_window_bounds(now: float) -> dict[str, tuple[str, float, float]]:
    """:func:`window_bounds` of every window (computed once per second: on the request path)."""
    global _bounds_cache
    second = int(now)
    cached_second, bounds = _bounds_cache
    if cached_second != second:
        bounds = {w: window_bounds(w, second) for w in WINDOWS}
        _bounds_cache = (second, bounds)
    return bounds


def settings_key(scope: str, subject: str, tag: str | None = None) -> str:
    """``budgetcfg:{<tag>}:<scope>:<subject>``: a guard of the reservation script, so in its slot."""
    return f"budgetcfg:{{{_quoted(subject if tag is None else tag)}}}:{scope}:{_quoted(subject)}"


@dataclass(slots=True, frozen=True)
class Subject:
    """Who is charged: ``scope`` and ``id``. ``tenant`` (not part of its identity) is the tenant a
    workflow or an API key belongs to: their counters share the tenant's hash slot, so a
    request's reservation is one script on a Redis Cluster."""

    scope: str
    id: str
    tenant: str | None = field(default=None, compare=False)

    @property
    def tag(self) -> str:
        """The hash tag of this subject's keys: its tenant (a workflow without ``tenant`` given:
        the part of its id before the first ``/``; an API key without: the key id)."""
        if self.scope == "tenant":
            return self.id
        if self.tenant:
            return self.tenant
        return self.id.split("/", 1)[0] if self.scope == "workflow" else self.id

    def describe(self) -> str:
        return f"{self.scope.replace('_', ' ')} {self.id!r}"


def subjects_of(tenant: str | None, workflow: str | None, api_key_id: str | None) -> list[Subject]:
    """The subjects a request is charged to (all with one :attr:`Subject.tag`: the tenant)."""
    out = []
    if tenant:
        out.append(Subject("tenant", tenant))
        if workflow:
            out.append(Subject("workflow", f"{tenant}/{workflow}", tenant))
    if api_key_id:
        out.append(Subject("api_key", api_key_id, tenant or None))
    return out


@dataclass(slots=True)
class Planned:
    """One counter of a reservation, and what it means."""

    subject: Subject
    metric: str
    window: str
    limit: int | None
    end: float

    def describe(self) -> str:
        return f"{self.subject.describe()}: {self.metric} per {self.window}"


@dataclass(slots=True)
class _Prepared:
    """A set of subjects' counters for one minute: the store plan and what each counter means."""

    plan: ReservePlan
    planned: list[Planned]
    limited: list[tuple[int, int]]  # (counter index, limit) of the limited counters


@dataclass(slots=True)
class Admission:
    """The outcome of :meth:`BudgetLedger.reserve`."""

    ok: bool
    max_ratio: float = 0.0  # the fullest limited counter after this reservation (1.0 = at the limit)
    refused: Planned | None = None  # the budget that did not fit
    level: int = 0  # its level before this request (spent + reserved)
    requested: int = 0  # what this request asked of it
    retry_after: int = 0  # seconds until its window resets
    source: str = "store"  # "block": admitted from this worker's leased block, without a store call


class BudgetLedger:
    """Limits per subject and the store operations budgets need.

    :param store: the gateway's store (Redis to share budgets across workers and gateways).
    :param defaults: limits per scope for subjects without their own.
    :param configured: limits of named subjects from the configuration.
    :param track: windows counted per scope even without a limit (so spend can be read).
    :param settings_ttl: seconds an admin-set override is cached in this process for reading
        (:meth:`limits_for`, :meth:`report`); admission checks the overrides in the store each time.
    :param grace: seconds a counter outlives its window (a request admitted at the end of a window
        is reconciled into the window that admitted it).
    :param leases: admit from budget blocks leased by this worker (:mod:`extproc_plugins.budgets.leases`);
        None: every admission is a store call of its own.
    """

    def __init__(self, store: Store, *, defaults: Mapping[str, Limits] | None = None,
                 configured: Mapping[tuple[str, str], Limits] | None = None,
                 track: Mapping[str, Iterable[str]] | None = None, settings_ttl: float = 2.0,
                 grace: float = 3600.0, cache_size: int = 10_000, leases: LeaseSettings | None = None):
        self.store = store
        self.reservations: ReservationStore = reservations_for(store)
        self.defaults = dict(defaults or {})
        self.configured = dict(configured or {})
        self.track = {scope: tuple(windows) for scope, windows in (track or {}).items()}
        self.settings_ttl = settings_ttl
        self.grace = grace
        self.cache_size = cache_size
        self._cache: dict[tuple[str, str], tuple[Limits | None, float]] = {}
        self._seen: dict[Subject, bytes | None] = {}  # override records as the last admission saw them
        self._plans: dict[tuple, _Prepared] = {}
        self.leases = None if leases is None else LeaseBook(leases, self._reserve_planned, self.reservations.commit_metrics,
                                                            self._prepared, max_keys=cache_size)

    # limits ------------------------------------------------------------------------------
    async def overrides(self, subjects: list[Subject]) -> dict[Subject, Limits | None]:
        """Admin-set limits of these subjects (cached ``settings_ttl`` seconds in this process)."""
        now = time.monotonic()
        out: dict[Subject, Limits | None] = {}
        missing = []
        for s in subjects:
            hit = self._cache.get((s.scope, s.id))
            if hit is not None and hit[1] > now:
                out[s] = hit[0]
            else:
                missing.append(s)
        if missing:
            values = await self.store.get_records([settings_key(s.scope, s.id, s.tag) for s in missing])
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()
            for s, raw in zip(missing, values):
                limits = Limits.model_validate_json(raw) if raw else None
                self._cache[(s.scope, s.id)] = (limits, now + self.settings_ttl)
                out[s] = limits
        return out

    async def limits_for(self, subject: Subject) -> Limits | None:
        """The limits in force for one subject (override > configured > scope default)."""
        override = (await self.overrides([subject]))[subject]
        return self._effective(subject, override)

    def _effective(self, subject: Subject, override: Limits | None) -> Limits | None:
        if override is not None:
            return override
        return self.configured.get((subject.scope, subject.id)) or self.defaults.get(subject.scope)

    async def set_limits(self, subject: Subject, limits: Limits | None) -> None:
        """Set (or with None, remove) a subject's override; the next admission anywhere applies it."""
        key = settings_key(subject.scope, subject.id, subject.tag)
        if limits is None:
            await self.store.delete_record(key)
        else:
            await self.store.put_record(key, limits.model_dump_json(exclude_none=True).encode())
        self._cache.pop((subject.scope, subject.id), None)
        self._learn((subject,), [None if limits is None else limits.model_dump_json(exclude_none=True).encode()])

    # planning --------------------------------------------------------------------------------
    def plan(self, subject_limits: Mapping[Subject, Limits | None], now: float) -> list[tuple[str, Planned]]:
        """Every counter a request of these subjects touches: limited ones and tracked windows."""
        out: list[tuple[str, Planned]] = []
        bounds = all_window_bounds(now)
        for subject, limits in subject_limits.items():
            tracked = self.track.get(subject.scope, ())
            for window in WINDOWS:
                bucket, _start, end = bounds[window]
                for metric in METRICS:
                    limit = limits.limit(metric, window) if limits is not None else None
                    if limit is None and window not in tracked:
                        continue
                    key = counter_key(subject.scope, subject.id, metric, window, bucket, subject.tag)
                    out.append((key, Planned(subject, metric, window, limit, end)))
        return out

    def _prepared(self, subjects: tuple[Subject, ...], now: float) -> "_Prepared":
        """The store plan for these subjects in this minute (every window changes on a minute)."""
        minute = int(now // 60)
        key = (subjects, minute)
        hit = self._plans.get(key)
        if hit is not None:
            return hit
        # Subjects of several tags (an API key Subject made without its tenant) work on one node;
        # on a cluster that reservation is CROSSSLOT (StoreUnavailable). subjects_of never does it.
        seen = [self._seen.get(s) for s in subjects]
        limits = {s: self._effective(s, Limits.model_validate_json(raw) if raw else None)
                  for s, raw in zip(subjects, seen)}
        planned = self.plan(limits, now)
        store_plan = ReservePlan(
            keys=[k for k, _ in planned], metrics=[METRIC_INDEX[p.metric] for _, p in planned],
            limits=[p.limit for _, p in planned], expire_at=[p.end + self.grace for _, p in planned],
            guards=[settings_key(s.scope, s.id, s.tag) for s in subjects], expected=seen)
        limited = [(i, p.limit) for i, (_, p) in enumerate(planned) if p.limit is not None]
        prepared = _Prepared(store_plan, [p for _, p in planned], limited)
        if len(self._plans) >= self.cache_size:
            self._plans.clear()
        self._plans[key] = prepared
        return prepared

    def _learn(self, subjects: tuple[Subject, ...], current: list[bytes | None]) -> None:
        """The override records as the store has them now (a reservation found them changed)."""
        if len(self._seen) + len(subjects) > self.cache_size:
            self._seen.clear()
        for s, raw in zip(subjects, current):
            self._seen[s] = raw
        self._plans = {k: v for k, v in self._plans.items() if not set(k[0]) & set(subjects)}

    # the request path ------------------------------------------------------------------------
    async def reserve(self, reservation_id: str, subjects: list[Subject], amounts: Mapping[str, int],
                      *, ttl: float, now: float | None = None) -> Admission:
        """Reserve ``amounts`` (metric -> units) on every counter of ``subjects``, all or nothing."""
        now = time.time() if now is None else now
        subjects_t = tuple(subjects)
        vector = [int(amounts.get(m, 0)) for m in METRICS]
        if not subjects_t:
            return Admission(True)
        leases = self.leases
        if leases is not None:
            ratio = leases.take(reservation_id, subjects_t, vector, now)
            if ratio is None:
                ratio = await leases.open(reservation_id, subjects_t, vector, ttl, now)
            if ratio is not None:
                return Admission(True, max_ratio=ratio, source="block")
        prepared, result = await self._reserve_planned(reservation_id, subjects_t, vector, ttl, now)
        if not result.ok:
            p = prepared.planned[result.failed]
            return Admission(False, refused=p, level=result.levels[result.failed],
                             requested=vector[METRIC_INDEX[p.metric]],
                             retry_after=max(1, math.ceil(p.end - now)))
        if leases is not None:
            leases.learn(subjects_t, prepared, result.levels, vector, now)
        ratio = 0.0
        levels, metrics = result.levels, prepared.plan.metrics
        for i, limit in prepared.limited:
            if limit:
                ratio = max(ratio, (levels[i] + vector[metrics[i]]) / limit)
            else:
                ratio = max(ratio, 1.0)
        return Admission(True, max_ratio=ratio)

    async def _reserve_planned(self, reservation_id: str, subjects: tuple[Subject, ...], vector: list[int],
                               ttl: float, now: float):
        """One store reservation of ``vector`` on these subjects' plan: ``(prepared, result)``.
        Plans again (once per changed override) when the store says an admin override changed."""
        for _ in range(4):
            prepared = self._prepared(subjects, now)
            result = await self.reservations.reserve_plan(reservation_id, prepared.plan, vector, ttl)
            if result.stale is None:
                return prepared, result
            self._learn(subjects, result.stale)  # an override changed: plan with it, once more
        raise StoreUnavailable("budget settings changed on every attempt to reserve")

    async def commit(self, reservation_id: str, actual: Mapping[str, int]) -> bool:
        """Reconcile a reservation to the real amounts (metric -> units; a metric not given keeps
        its reserved amount); once."""
        vector = [int(actual.get(m, -1)) for m in METRICS]
        if await self._settled_in_block(reservation_id, vector):
            return True
        return await self.reservations.commit_metrics(reservation_id, vector)

    async def release(self, reservation_id: str) -> bool:
        """Give a reservation back (aborted or failed request); once."""
        if await self._settled_in_block(reservation_id, None):
            return True
        return await self.reservations.release(reservation_id)

    async def _settled_in_block(self, reservation_id: str, vector: list[int] | None) -> bool:
        """Settle a request admitted from a leased block (None: released); False if it was not."""
        if self.leases is None or not self.leases.owns(reservation_id):
            return False
        if self.leases.settle(reservation_id, vector):
            await self.leases.maintain()  # the block it came from is done: close it now
        return True

    # reading ---------------------------------------------------------------------------------
    async def report(self, subject: Subject, now: float | None = None) -> dict:
        """Spend, reserved, limit and remaining per metric and window, for the current windows."""
        now = time.time() if now is None else now
        limits = await self.limits_for(subject)
        rows = []
        keys = []
        for window in WINDOWS:
            bucket, start, end = window_bounds(window, now)
            for metric in METRICS:
                keys.append(counter_key(subject.scope, subject.id, metric, window, bucket, subject.tag))
                rows.append((metric, window, start, end))
        counters = await self.reservations.read_counters(keys)
        out = []
        for (metric, window, start, end), (total, held) in zip(rows, counters):
            limit = limits.limit(metric, window) if limits is not None else None
            out.append({
                "metric": metric, "window": window, "window_start": start, "window_end": end,
                "spent": total - held, "reserved": held, "limit": limit,
                "remaining": None if limit is None else max(0, limit - total),
            })
        return {"scope": subject.scope, "subject": subject.id,
                "limits": limits.compact() if limits is not None else {}, "windows": out}


def ledger_from_tables(store: Store, tables: BudgetTables, **kwargs) -> BudgetLedger:
    """A ledger for the configuration's tables."""
    return BudgetLedger(store, defaults=tables.defaults, configured=tables.configured(), track=tables.track, **kwargs)
