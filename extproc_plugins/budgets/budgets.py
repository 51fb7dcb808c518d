"""Budgets and rate limits: token, USD and request limits per tenant, workflow and API key.

Over several windows at once (minute, hour, day, month; see :mod:`extproc_plugins.budgets.ledger`).

* **Admission** (``extproc_request_parsed``): reserve the worst case, ``prompt + max_tokens``
  tokens, its price on the expected tier (the pinned one, or the default tier for ``auto``) and
  one request, the prompt counted as the tier's upstream will count and bill it (for Triton: the
  chat template applied, the tier's tokenizer; ``Upstream.prompt_tokens``), on every counter of the request's subjects, in one atomic store
  operation (a Lua script on Redis). A budget that would go over refuses with a 429, an
  OpenAI-style error naming it, and ``Retry-After`` (seconds until its window resets). Past
  ``soft_threshold`` of any limit the request goes on with ``ctx.over_soft_budget = True`` (the
  routing policy may downgrade it) and ``x-extproc-budget: soft_limit``.
* **Tier or prompt change** (``extproc_before_upstream``): if routing chose another tier than
  the expected one, or a policy changed the prompt since admission (retrieval), the prompt is
  counted again for the tier it goes to and any difference upwards is reserved too (or the
  request refused).
* **Reconcile** (``extproc_response_complete``): the reservation becomes the real usage
  (``ctx.usage`` tokens, ``ctx.cost_usd``).
* **Abort** (the client went away after the request was sent upstream): with ``on_abort:
  charge_delivered`` (the default) the request is charged its request count, its prompt and the
  completion tokens already delivered: hanging up before the end neither dodges
  ``requests_per_day`` nor gets what was read for free. ``on_abort: release`` gives it all back
  (only for deployments that accept that hole).
* **Release** (``extproc_request_finished``, not completed and not sent upstream, or failed, or
  answered by a later policy): the reservation is given back.

Reconcile and release are off the response path: they go into a bounded queue per worker that a
background task sends to the store (concurrent ones pipelined together), so the last body chunk
is never held while Redis is written. The reservation already holds the worst case, so a
reconcile that lands a moment later only over-counts for that moment. A full queue makes the
request wait for its own settlement (back-pressure, nothing dropped); graceful shutdown (SIGTERM)
sends everything queued before the worker exits.

**Leases** (``leases``, on by default with Redis): instead of one store call per admission, a
worker reserves a small block of budget for a set of subjects (one store call, the same atomic
script) and admits the next requests of those subjects from it in memory; the block is reconciled
to its requests' real usage when it is retired (after ``leases.seconds``) and they are settled. It
is an ordinary reservation in the store, so nothing is ever overspent; near a limit, or under
small limits, every request is reserved on its own (see :mod:`extproc_plugins.budgets.leases`).

Store unreachable at admission: ``on_store_unavailable: reject`` (default) answers 503
``budget_unavailable`` with ``Retry-After: 1`` (a cost-control gateway does not let unmetered
traffic through); ``admit`` lets it through flagged (``x-extproc-degraded``). A reconcile or
release that cannot reach the store is retried in the background (bounded queue) until the
reservation's TTL; a reservation never settled (a crashed gateway) keeps its worst case charged
until its window ends: spend is over-counted, never under-counted.

With the in-memory store every worker process has its own counters, so with N workers each limit
is N times looser: start-up refuses that unless ``per_worker_limits: true``; use Redis
(``state.redis_url``) to enforce budgets across workers and gateways.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from typing import Literal

from pydantic import ConfigDict, Field

from extproc.formats import tokens
from extproc_plugins.budgets.leases import LeaseSettings
from extproc_plugins.budgets.outage_log import OutageLog
from extproc_plugins.budgets.ledger import (BudgetLedger, BudgetTables, ledger_from_tables, subjects_of, units_to_usd,
                                   usd_to_units)
from extproc.wire.decisions import Reply
from extproc.framework.hookspecs import hookimpl
from extproc.observability.metrics import get_metrics
from extproc.formats.openai import OpenAIError, Usage
from extproc.upstreams.registry import upstream_for
from extproc.state.memory import MemoryStore
from extproc.state.store import StoreUnavailable

log = logging.getLogger(__name__)

NAME = "budgets"


class _Pending:
    """Settlements that could not reach the store, retried in the background (bounded)."""

    def __init__(self, maxlen: int = 10_000):
        self.queue: collections.deque = collections.deque(maxlen=maxlen)
        self.dropped = 0

    def add(self, item) -> None:
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("budgets: %d settlement(s) dropped: the retry queue is full (store down too long); "
                          "their reservations stay charged until they expire", self.dropped)
        self.queue.append(item)


class Budgets:
    """Reserve the worst case at admission, reconcile to real usage, release what was not used."""

    class Settings(BudgetTables):
        """The limit tables (:class:`~extproc_plugins.budgets.ledger.BudgetTables`) and how to enforce them."""

        model_config = ConfigDict(extra="forbid")

        soft_threshold: float = Field(0.8, gt=0, le=1)
        reservation_ttl_seconds: float = Field(900, gt=0, description="longest a request may hold a reservation")
        on_store_unavailable: Literal["reject", "admit"] = "reject"
        on_abort: Literal["release", "charge_delivered"] = Field(
            "charge_delivered", description="an aborted request that reached the upstream: charge its request, "
            "prompt and delivered tokens (charge_delivered), or give it all back (release)")
        per_worker_limits: bool = Field(False, description="accept per-worker limits with the memory store")
        settings_cache_seconds: float = Field(2.0, ge=0, description="admin API reads cache limits this long "
                                              "(admission always checks the store's)")
        settle_queue_size: int = Field(10_000, ge=1, description="reconciles/releases queued per worker; "
                                       "past it a request waits for its own (back-pressure)")
        leases: LeaseSettings = Field(default_factory=LeaseSettings,
                                      description="admit from budget blocks leased per worker (extproc_plugins.budgets.leases)")

    def __init__(self, settings: "Budgets.Settings"):
        self.settings = settings
        self.ledger: BudgetLedger | None = None
        self.gateway = None
        self.pending = _Pending()
        self._retry_task: asyncio.Task | None = None
        self._settle_queue: collections.deque = collections.deque()
        self._settle_wake: asyncio.Event | None = None
        self._settle_idle: asyncio.Event | None = None
        self._settling = 0  # settlements taken from the queue and not finished yet
        self._settle_task: asyncio.Task | None = None
        self._lease_task: asyncio.Task | None = None
        self._admissions = get_metrics().budget_admissions
        self._outage = OutageLog(settings.on_store_unavailable)

    # start and stop ------------------------------------------------------------------------
    @hookimpl
    async def extproc_startup(self, gateway):
        s = self.settings
        workers = gateway.config.server.workers
        if isinstance(gateway.store, MemoryStore) and workers != 1 and not s.per_worker_limits:
            raise RuntimeError(
                "budgets: the in-memory store is per worker process, so with "
                f"{'one worker per core' if workers == 0 else f'{workers} workers'} every limit would be "
                "that many times looser. Set state.redis_url (budgets shared by every worker and gateway), "
                "or server.workers: 1, or budgets settings per_worker_limits: true to accept it.")
        self.gateway = gateway
        leasing = s.leases.enabled == "on" or (s.leases.enabled == "auto" and not isinstance(gateway.store, MemoryStore))
        self.ledger = ledger_from_tables(gateway.store, s, settings_ttl=s.settings_cache_seconds,
                                         grace=s.reservation_ttl_seconds, leases=s.leases if leasing else None)
        loop = asyncio.get_running_loop()
        if leasing:
            self._lease_task = loop.create_task(self._lease_loop())
        self._settle_wake, self._settle_idle = asyncio.Event(), asyncio.Event()
        self._settle_idle.set()
        self._settle_task = loop.create_task(self._settle_loop())
        self._retry_task = loop.create_task(self._retry_loop())

    @hookimpl
    async def extproc_shutdown(self, gateway):
        if self._settle_task is not None:
            try:  # every queued settlement is sent (or parked for the last retry) before the worker exits
                await asyncio.wait_for(self.settled(), timeout=max(5.0, len(self._settle_queue) / 100))
            except asyncio.TimeoutError:
                log.error("budgets: %d settlement(s) still queued at shutdown", len(self._settle_queue))
            self._settle_task.cancel()  # later settlements (streams still closing) are applied inline
            try:
                await self._settle_task
            except asyncio.CancelledError:
                pass
        if self._lease_task is not None:
            self._lease_task.cancel()
            try:  # every block goes back: unused budget returned, real usage recorded
                await self.ledger.leases.maintain(final=True)
            except Exception:  # noqa: BLE001 - what stays reserved expires as spent (never under-counted)
                log.exception("budgets: closing leased blocks at shutdown failed")
        if self._retry_task is not None:
            self._retry_task.cancel()
        await self._retry_pending()  # a last try before the worker exits
        if self.pending.queue:
            log.warning("budgets: %d reservation(s) left unsettled at shutdown (their worst case stays charged)",
                        len(self.pending.queue))

    # admission -----------------------------------------------------------------------------
    def _expected_tier(self, ctx):
        tiers = self.gateway.tiers
        name = tiers.resolve(ctx.request.model) or tiers.default
        return name, tiers.tiers[name]

    def _worst_case(self, ctx, tier) -> dict[str, int]:
        req = ctx.request
        prompt = upstream_for(tier).prompt_tokens(tier, req)  # as the upstream will bill it
        if ctx.prompt_tokens_estimate is None:
            ctx.prompt_tokens_estimate = prompt
        completion = req.max_tokens or tier.default_max_tokens
        usd = self.gateway.cost_model.upstream_cost(tier, Usage(prompt, completion))
        return {"requests": 1, "tokens": prompt + completion, "usd": usd_to_units(usd)}

    @hookimpl
    async def extproc_request_parsed(self, ctx):  # timed by the plugin manager ("plugin:budgets")
        subjects = subjects_of(ctx.tenant, ctx.workflow, ctx.api_key_id)
        tier_name, tier = self._expected_tier(ctx)
        amounts = self._worst_case(ctx, tier)
        rid = uuid.uuid4().hex
        try:
            admission = await self.ledger.reserve(rid, subjects, amounts, ttl=self.settings.reservation_ttl_seconds)
        except StoreUnavailable as exc:
            return self._store_down(ctx, exc)
        except asyncio.CancelledError:  # the stream went away mid-call: the script may have run
            self._release_later(rid)
            raise
        self._outage.up()
        if not admission.ok:
            return self._refuse(ctx, admission)
        self._admissions.labels(admission.source).inc()
        ctx.plugin_state[NAME] = {"subjects": subjects, "open": [rid], "amounts": amounts,
                                  "tier": tier_name, "delivered": [], "settled": False, "sent": False,
                                  "prompt_tokens": ctx.prompt_tokens_estimate}
        soft = admission.max_ratio >= self.settings.soft_threshold
        ctx.over_soft_budget = ctx.over_soft_budget or soft
        ctx.budget_status = "soft_limit" if soft else "ok"
        ctx.response_headers["x-extproc-budget"] = ctx.budget_status
        if soft:
            ctx.route_trace.append(f"budgets: over the soft threshold ({admission.max_ratio:.0%} of a limit)")
        return None

    def _store_down(self, ctx, exc):
        self._outage.down(exc)
        ctx.budget_status = "unavailable"
        if self.settings.on_store_unavailable == "admit":
            if NAME not in ctx.degraded:
                ctx.degraded.append(NAME)
            return None
        err = OpenAIError(503, "The gateway cannot check budgets right now; please retry.",
                          type="server_error", code="budget_unavailable")
        return Reply(503, err.to_json(), [("content-type", "application/json"), ("retry-after", "1")],
                     details="extproc_budget_unavailable")

    def _refuse(self, ctx, admission):
        p = admission.refused
        name = p.describe()
        fmt = (lambda v: f"${units_to_usd(v):.6f}") if p.metric == "usd" else str
        per_minute = p.window == "minute"
        kind = "Rate limit" if per_minute else "Budget"
        message = (f"{kind} exceeded: {name} (limit {fmt(p.limit)}, used {fmt(admission.level)}, "
                   f"requested {fmt(admission.requested)}). Retry after {admission.retry_after} s.")
        if admission.requested > (p.limit or 0):
            message += " This request alone is larger than the limit."
        ctx.budget_status = f"rejected:{name}"
        err = OpenAIError(429, message, type="rate_limit_error" if per_minute else "insufficient_quota",
                          code="rate_limit_exceeded" if per_minute else "budget_exceeded")
        headers = [("content-type", "application/json"), ("retry-after", str(admission.retry_after)),
                   ("x-extproc-budget", name)]
        return Reply(429, err.to_json(), headers, details="extproc_budget_exceeded")

    # the tier routing chose ------------------------------------------------------------------
    @hookimpl
    async def extproc_before_upstream(self, ctx, upstream):
        state = ctx.plugin_state.get(NAME)
        if state is None or ctx.tier_config is None:
            return None
        state["sent"] = True  # from here on the upstream may spend: an abort is charged
        changed = ctx.prompt_tokens_estimate is None or ctx.prompt_tokens_estimate != state["prompt_tokens"]
        if ctx.tier == state["tier"] and not changed:
            return None
        reserved = state["amounts"]
        needed = self._worst_case(ctx, ctx.tier_config)
        extra = {m: needed[m] - reserved[m] for m in ("tokens", "usd") if needed[m] > reserved[m]}
        if not extra:
            return None
        rid = uuid.uuid4().hex
        try:
            admission = await self.ledger.reserve(rid, state["subjects"], extra,
                                                  ttl=self.settings.reservation_ttl_seconds)
        except StoreUnavailable as exc:
            return self._store_down(ctx, exc)
        except asyncio.CancelledError:
            self._release_later(rid)
            raise
        if not admission.ok:
            return self._refuse(ctx, admission)
        state["open"].append(rid)
        return None

    # settling --------------------------------------------------------------------------------
    @hookimpl
    def extproc_response_chunk(self, ctx, chunk):
        state = ctx.plugin_state.get(NAME)
        if state is not None and self.settings.on_abort == "charge_delivered" and chunk.text:
            state["delivered"].append(chunk.text)

    @hookimpl
    async def extproc_response_complete(self, ctx):
        state = ctx.plugin_state.get(NAME)
        if state is None or state["settled"]:
            return
        if ctx.usage is None:  # no usage reported or counted: keep the worst case (never under-count)
            actual = {}
        else:
            actual = {"requests": 1, "tokens": ctx.usage.total_tokens, "usd": usd_to_units(ctx.cost_usd or 0.0)}
        await self._settle(state, actual)

    @hookimpl
    async def extproc_request_finished(self, ctx):
        state = ctx.plugin_state.get(NAME)
        if state is None or state["settled"]:
            return
        actual = None  # release
        if ctx.outcome == "aborted" and self.settings.on_abort == "charge_delivered" and state["sent"]:
            tier = ctx.tier_config
            completion = tokens.count_text("".join(state["delivered"]), tier.tokenizer) if tier else 0
            prompt = upstream_for(tier).prompt_tokens(tier, ctx.request) if tier else 0
            usage = Usage(prompt, completion)
            usd = self.gateway.cost_model.upstream_cost(tier, usage) if tier else 0.0
            actual = {"requests": 1, "tokens": usage.total_tokens, "usd": usd_to_units(usd)}
        await self._settle(state, actual)

    async def _settle(self, state, actual: dict | None) -> None:
        """Commit the first reservation to ``actual`` (None: release it) and release any top-ups,
        in the background (queued; awaited here only when the queue is full)."""
        state["settled"] = True
        for i, rid in enumerate(state["open"]):
            op = ("commit", rid, actual) if (i == 0 and actual is not None) else ("release", rid, None)
            if len(self._settle_queue) + self._settling < self.settings.settle_queue_size and \
                    self._settle_task is not None and not self._settle_task.done():
                self._enqueue(op)
            else:  # back-pressure: the store is behind; this request waits for its own settlement
                await self._apply_or_park(op)

    def _enqueue(self, op) -> None:
        self._settle_queue.append(op)
        self._settle_idle.clear()
        self._settle_wake.set()

    async def settled(self) -> None:
        """Wait until every queued settlement was sent to the store (or parked for retry), and
        give back every leased block nothing is in flight on."""
        if self._settle_idle is not None:
            while self._settle_queue or self._settling:
                await self._settle_idle.wait()
        if self.ledger is not None and self.ledger.leases is not None:
            await self.ledger.leases.maintain(retire_all=True)

    async def _settle_loop(self) -> None:
        queue = self._settle_queue
        while True:
            if not queue:
                self._settle_wake.clear()
                if not self._settling:
                    self._settle_idle.set()
                await self._settle_wake.wait()
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), 1024))]
            self._settling += len(batch)
            try:  # concurrent calls: the store sends them in one pipeline
                await asyncio.gather(*(self._apply_or_park(op) for op in batch))
            finally:
                self._settling -= len(batch)

    async def _apply_or_park(self, op) -> None:
        try:
            await self._apply(op)
        except StoreUnavailable:
            self.pending.add((op, time.monotonic() + self.settings.reservation_ttl_seconds))
        except Exception:  # noqa: BLE001 - a bug must not stop the settling of the others
            log.exception("budgets: settling reservation %s failed", op[1])

    def _release_later(self, rid: str) -> None:
        """Release a reservation whose caller was cancelled (queued; retried if the store is down)."""
        if self._settle_task is not None and not self._settle_task.done():
            self._enqueue(("release", rid, None))
        else:  # shutting down: no queue any more
            self.pending.add((("release", rid, None), time.monotonic() + self.settings.reservation_ttl_seconds))

    async def _apply(self, op) -> None:
        kind, rid, actual = op
        if kind == "commit":
            await self.ledger.commit(rid, actual)
        else:
            await self.ledger.release(rid)

    async def _retry_pending(self) -> None:
        queue = self.pending.queue
        for _ in range(len(queue)):
            op, deadline = queue.popleft()
            if time.monotonic() > deadline:
                continue  # the reservation expired in the store: nothing left to settle
            try:
                await self._apply(op)
            except StoreUnavailable:
                queue.appendleft((op, deadline))
                return

    async def _lease_loop(self) -> None:
        """Retire leased blocks past their time and give back what they did not use."""
        interval = min(0.25, self.settings.leases.seconds / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.ledger.leases.maintain()
            except Exception:  # noqa: BLE001 - keep maintaining whatever happened
                log.exception("budgets: maintaining leased blocks failed")

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.pending.queue:
                try:
                    await self._retry_pending()
                except Exception:  # noqa: BLE001 - keep retrying whatever happened
                    log.exception("budgets: retrying settlements failed")
