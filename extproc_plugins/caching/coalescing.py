"""In-flight coalescing (single flight): identical requests running at once cost one upstream call.

The first request with a given exact key (the exact cache's key: tenant, tier, model, canonical
request) becomes the *leader* and goes upstream; identical requests arriving while it runs are
*followers*: they wait for its answer and are answered with it (``x-extproc-cache: coalesced``),
as JSON or SSE, whichever each asked for. A streamed follower gets the whole answer at once when
the leader finishes (it does not see the leader's tokens as they come).

Two levels, so a worker never sends more than one waiter to Redis per key:

* within a worker, followers await the local leader's future;
* across workers and gateways (``state.redis_url``), the leader holds ``co:lock:<key>``
  (SET NX with a TTL, kept alive by a heartbeat while it runs) and writes its answer to
  ``co:res:<key>:<token>``; a follower elsewhere polls that key (5 ms, backing off to 50 ms).

Leader failure never leaves followers hanging:

* the leader's upstream fails, its client leaves, or a later policy answers instead: it publishes
  "retry" and releases the lock at once; followers race for the lock again, one leads;
* the leader's answer cannot be shared (tool calls, too large...): "alone", followers go upstream
  on their own;
* the leader's process dies: its heartbeat stops, the lock expires after ``lock_ttl_seconds``,
  followers see the lock gone and race again;
* in every case a follower waits at most ``max_wait_seconds`` in total, then goes upstream on its
  own (never an error: its request is valid). The gateway asks Envoy for more time than its 2 s
  message timeout while a follower waits (see ``extproc/wire/processor.py``), so ``max_wait_seconds`` must
  stay under Envoy's ``max_message_timeout`` (30 s).

Only deterministic requests are coalesced by default (two clients sampling at temperature 1 expect
two different answers). ``Cache-Control: no-cache`` opts a request out. Redis unavailable:
coalescing within each worker only.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from extproc.state.breaker import Breaker
from extproc_plugins.caching.cache_control import parse_cache_headers
from extproc_plugins.caching.cache_keys import Normalization, deterministic, exact_fingerprint
from extproc_plugins.caching.cached_answer import (
    CachedAnswer, completed_answer, feed_shared_capture, note_bypass, note_lookup, note_miss, serve,
    shared_capture,
)
from extproc.framework.hookspecs import hookimpl
from extproc.upstreams.registry import default_max_tokens
from extproc.state.memory import MemoryStore
from extproc.state.store import StoreUnavailable

NAME = "coalescing"
LAYER = "coalescing"

RETRY = "retry"  # the leader failed: race for the lock again
ALONE = "alone"  # go upstream without coalescing (answer not shareable, waited too long)
_MARK = {RETRY: b"!retry", ALONE: b"!alone"}


@dataclass(eq=False)
class _Flight:
    """One key in flight in this worker: its local followers await ``done``."""

    key: str
    done: asyncio.Future
    token: bytes | None = None  # set when this worker holds the cross-process lock
    published: bool = False
    followers: int = field(default=0)


class Coalescing:
    """Identical concurrent requests share one upstream call."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        max_wait_seconds: float = Field(20.0, gt=0, le=28, description="a follower's longest wait, then alone")
        lock_ttl_seconds: float = Field(6.0, ge=1, description="a dead leader's lock lasts this long")
        result_ttl_seconds: float = Field(30.0, gt=0, description="how long followers elsewhere can read the answer")
        poll_min_ms: float = Field(5.0, gt=0)
        poll_max_ms: float = Field(50.0, gt=0)
        max_temperature: float = Field(0.0, ge=0, le=2)
        default_temperature: float = Field(1.0, ge=0, le=2)
        normalization: Normalization = Field(default_factory=Normalization)
        max_answer_bytes: int = Field(1024 * 1024, gt=0)
        store_retry_seconds: float = Field(1.0, gt=0)

    def __init__(self, settings: "Coalescing.Settings"):
        self.settings = settings
        self.store = None
        self.breaker = Breaker(NAME, settings.store_retry_seconds)
        self._flights: dict[str, _Flight] = {}
        self._heartbeat: asyncio.Task | None = None

    @hookimpl
    def extproc_startup(self, gateway):
        # Memory state is per worker: local futures already do everything; no store needed.
        self.store = None if isinstance(gateway.store, MemoryStore) else gateway.store

    @hookimpl
    async def extproc_shutdown(self, gateway):
        if self._heartbeat is not None:
            self._heartbeat.cancel()

    @property
    def in_flight(self) -> int:
        """Keys this worker is leading or waiting on (bounded by concurrent requests)."""
        return len(self._flights)

    def key(self, ctx) -> str:
        return exact_fingerprint(ctx, norm=self.settings.normalization,
                                        default_max_tokens=default_max_tokens(ctx.tier_config))

    # ---------------------------------------------------------------- request phase
    @hookimpl
    async def extproc_before_upstream(self, ctx, upstream):
        s = self.settings
        if not deterministic(ctx.request, max_temperature=s.max_temperature, default_temperature=s.default_temperature):
            note_lookup(ctx, LAYER, "skip")
            return None
        if parse_cache_headers(ctx.headers).no_cache:
            note_lookup(ctx, LAYER, "bypass")
            note_bypass(ctx)
            return None
        key = self.key(ctx)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.max_wait_seconds
        started = time.perf_counter()
        while True:
            flight = self._flights.get(key)
            if flight is not None:  # someone in this worker leads, or waits on a leader elsewhere
                flight.followers += 1
                try:
                    outcome = await asyncio.wait_for(asyncio.shield(flight.done), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    outcome = "timeout"
                finally:
                    flight.followers -= 1
                if outcome == RETRY and loop.time() < deadline:
                    continue
                return self._followed(ctx, outcome, started)
            flight = self._flights[key] = _Flight(key, loop.create_future())
            try:
                outcome = await self._lead_or_follow(flight, deadline)
            except BaseException:  # cancelled (the client left) or a bug: never strand the others
                await self._publish(flight, RETRY)
                raise
            if outcome == "lead":
                shared_capture(ctx, s.max_answer_bytes)
                ctx.plugin_state[NAME] = flight
                note_lookup(ctx, LAYER, "leader")
                note_miss(ctx)
                ctx.timings_ms[NAME] = (time.perf_counter() - started) * 1000.0
                return None
            self._settle(flight, outcome)  # a leader elsewhere answered (or failed): tell local waiters
            return self._followed(ctx, outcome, started)

    def _followed(self, ctx, outcome, started: float):
        ctx.timings_ms[NAME] = (time.perf_counter() - started) * 1000.0
        if isinstance(outcome, CachedAnswer):
            return serve(ctx, outcome, status="coalesced", layer=LAYER)
        note_lookup(ctx, LAYER, "timeout" if outcome == "timeout" else "alone")
        note_miss(ctx)
        return None  # go upstream on its own

    async def _lead_or_follow(self, flight: _Flight, deadline: float):
        """Take the cross-process lock (``"lead"``) or wait for whoever holds it."""
        if self.store is None or self.breaker.open:
            return "lead"  # this worker alone
        loop = asyncio.get_running_loop()
        lock_key = "co:lock:" + flight.key
        token = os.urandom(8).hex().encode()
        try:
            while loop.time() < deadline:
                if await self.store.set_nx(lock_key, token, self.settings.lock_ttl_seconds):
                    flight.token = token
                    self._start_heartbeat()
                    self.breaker.ok()
                    return "lead"
                holder = await self.store.get(lock_key)
                if holder is None:
                    continue  # released in between: race again
                outcome = await self._poll(flight.key, holder, deadline)
                if outcome != RETRY:
                    return outcome
            return "timeout"
        except StoreUnavailable as exc:
            self.breaker.failed(exc)
            return "lead"

    async def _poll(self, key: str, holder: bytes, deadline: float):
        """Wait for the answer of the leader holding the lock with ``holder``."""
        loop = asyncio.get_running_loop()
        lock_key, result_key = "co:lock:" + key, f"co:res:{key}:{holder.decode()}"
        delay = self.settings.poll_min_ms / 1000.0
        while True:
            data = await self.store.get(result_key)
            if data is None and await self.store.get(lock_key) != holder:
                data = await self.store.get(result_key)  # it may have finished just now
                if data is None:
                    return RETRY  # the leader is gone without an answer (lock expired)
            if data is not None:
                if data == _MARK[RETRY]:
                    return RETRY
                if data == _MARK[ALONE]:
                    return ALONE
                try:
                    return CachedAnswer.from_bytes(data)
                except ValueError:
                    return ALONE
            remaining = deadline - loop.time()
            if remaining <= 0:
                return "timeout"
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, self.settings.poll_max_ms / 1000.0)

    # ---------------------------------------------------------------- leader side
    def _start_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        """Keep this worker's locks alive while their leaders run; stops when none is held."""
        interval = self.settings.lock_ttl_seconds / 3
        while any(f.token for f in self._flights.values()):
            await asyncio.sleep(interval)
            for flight in [f for f in self._flights.values() if f.token and not f.published]:
                try:
                    await self.store.expire_if("co:lock:" + flight.key, flight.token, self.settings.lock_ttl_seconds)
                except StoreUnavailable as exc:
                    self.breaker.failed(exc)

    def _settle(self, flight: _Flight, outcome) -> None:
        """Resolve local followers and forget the flight."""
        flight.published = True
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if not flight.done.done():
            flight.done.set_result(outcome)

    async def _publish(self, flight: _Flight, outcome) -> None:
        """The leader is done: tell followers here and elsewhere, then release the lock."""
        if flight.published:
            return
        self._settle(flight, outcome)
        if flight.token is None or self.store is None:
            return
        data = outcome.to_bytes() if isinstance(outcome, CachedAnswer) else _MARK[outcome]
        ttl = self.settings.result_ttl_seconds if isinstance(outcome, CachedAnswer) else self.settings.lock_ttl_seconds
        try:
            await self.store.set(f"co:res:{flight.key}:{flight.token.decode()}", data, ttl=ttl)
            await self.store.delete_if("co:lock:" + flight.key, flight.token)
        except StoreUnavailable as exc:
            self.breaker.failed(exc)  # followers elsewhere see the lock expire and race again

    @hookimpl
    def extproc_response_chunk(self, ctx, chunk):
        feed_shared_capture(ctx, chunk)

    @hookimpl
    async def extproc_response_complete(self, ctx):
        flight = ctx.plugin_state.get(NAME)
        if flight is None or ctx.response_status != 200:
            return
        answer = completed_answer(ctx, self.settings.max_answer_bytes)
        await self._publish(flight, answer if answer is not None else ALONE)

    @hookimpl
    async def extproc_request_finished(self, ctx):
        flight = ctx.plugin_state.pop(NAME, None)
        if flight is not None and not flight.published:
            await self._publish(flight, RETRY)  # failed, aborted, or answered by another policy
