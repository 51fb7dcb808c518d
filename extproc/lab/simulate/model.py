"""A discrete-event model (SimPy) of one tier's pool of inference replicas.

What is modelled, per tier (tiers are independent pools: see :mod:`.workload`):

* **Arrivals** at given times, each with prompt and completion token counts.
* **One queue per tier** (FIFO): a request waits there while every ready replica has all of its
  ``max_seqs`` slots taken; otherwise it goes to the least-occupied ready replica (a gateway or
  load balancer with least-requests routing).
* **A replica** serves up to ``max_seqs`` sequences at once with continuous batching. An admitted
  request takes a slot and joins the replica's prefill queue; one prefill pass takes every waiting
  prompt up to ``max_prefill_tokens`` and lasts ``curve.prefill_time(tokens)``; decoding of the
  other sequences pauses meanwhile (prefill and decode share the GPU; chunked prefill is not
  modelled). The first token is out at the end of the pass: **TTFT = queue wait + wait for the
  prefill pass + the pass**. Then the sequence decodes its completion tokens at
  ``curve.per_seq_rate(b)`` tokens/s, ``b`` the number of sequences decoding on the replica at the
  moment (it changes as sequences join and leave: every decoding sequence of a replica advances at
  the same rate, so the replica keeps one "virtual token clock" and a heap of finishing points,
  O(log b) per event). A finished sequence frees its slot for the queue's head.
* **Replicas come and go**: a new replica is billed from its creation and serves after
  ``startup_s`` (pod start-up); a scale-down removes starting replicas first, then idle ready
  ones, then drains the least-occupied (no new admissions; gone, and no longer billed, when its
  last sequence ends), as the ReplicaSet controller deletes unready pods before ready ones.
* **A scaling policy** (:mod:`.autoscalers`) is called every ``sync_period_s`` with an
  :class:`Observation` and returns the replica count it wants.

Accounting (up to the end of the day, ``until``): replica-seconds billed, replica-seconds with at
least one sequence (the rest is idle capacity, start-up included), slot-seconds. After ``until``
no request arrives; the model runs on until every request has its first token (at most
``drain_s``), so that each arrival of the day has a TTFT (``inf`` if it never got one).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import simpy

from extproc.lab.simulate.service_curves import ServiceCurve

STARTING, READY, DRAINING, GONE = range(4)


@dataclass(frozen=True)
class Observation:
    """What a scaling policy sees at a sync: the pool and its load at ``now``."""

    now: float
    ready: int  #: ready replicas (not draining)
    starting: int  #: replicas created, not ready yet
    queued: int  #: requests in the tier queue
    prefill_queued: int  #: admitted requests waiting for their prefill pass (all ready replicas)
    active: int  #: sequences on ready replicas (prefilling or decoding)
    max_seqs: int
    occupancy: tuple[float, ...]  #: mean occupied slots of each ready replica over the last sync period
    busy: tuple[float, ...] = ()  #: share of the last sync period each ready replica had a sequence
    arrived: int = 0  #: requests that arrived at the tier since the last sync (a counter's increase)

    @property
    def pending(self) -> int:
        """Requests waiting to be served (``nv_inference_pending_request_count`` summed over pods)."""
        return self.queued + self.prefill_queued

    @property
    def current(self) -> int:
        """The workload's replica count as the HPA sees it (draining pods are terminating)."""
        return self.ready + self.starting


class ScalingPolicy(Protocol):
    """Decides the replica count of a tier (see :mod:`.autoscalers`)."""

    name: str
    sync_period_s: float

    def initial(self) -> int:
        """Replicas ready at time 0."""

    def decide(self, obs: Observation) -> int:
        """The replica count wanted now (ready + starting)."""


class Replica:
    """One replica's state (plain slots for speed)."""

    __slots__ = ("rid", "state", "occ", "heap", "V", "t_last", "rate", "gen", "pq", "prefilling",
                 "t_created", "t_ready", "t_gone", "t_occ", "busy_since", "busy_s", "slot_s", "slot_mark", "busy_mark")

    def __init__(self, rid: int, now: float) -> None:
        self.rid = rid
        self.state = STARTING
        self.occ = 0  # slots taken (prefilling + decoding)
        self.heap: list = []  # (virtual finishing point, seq, request) of decoding sequences
        self.V = 0.0  # tokens decoded by every sequence on this replica since it started
        self.t_last = now
        self.rate = 0.0  # current per-sequence tokens/s
        self.gen = 0  # invalidates scheduled completion events
        self.pq: deque = deque()  # admitted, waiting for prefill
        self.prefilling = False
        self.t_created = now
        self.t_ready = math.inf
        self.t_gone = math.inf
        self.t_occ = now
        self.busy_since = now
        self.busy_s = 0.0
        self.slot_s = 0.0
        self.slot_mark = 0.0
        self.busy_mark = 0.0


@dataclass
class TierRun:
    """What one tier did over the day under one policy."""

    tier: str
    policy: str
    curve: str
    gpus: int
    gpu_hour_usd: float
    until: float
    requests: int
    ttft: np.ndarray  #: seconds, one per request (inf: no first token within the drain)
    replica_s: float  #: replica-seconds billed in [0, until]
    busy_s: float  #: replica-seconds with at least one sequence
    slot_s: float  #: occupied slot-seconds
    max_seqs: int
    series_t: list[float] = field(default_factory=list)  #: sync times
    series_replicas: list[int] = field(default_factory=list)  #: billed replicas (starting, ready, draining)
    series_ready: list[int] = field(default_factory=list)
    series_metric: list[float] = field(default_factory=list)  #: the policy's metric at each sync (nan if none)

    @property
    def gpu_hours(self) -> float:
        return self.replica_s * self.gpus / 3600.0

    @property
    def cost_usd(self) -> float:
        return self.gpu_hours * self.gpu_hour_usd


class TierSim:
    """One tier's pool of replicas in a SimPy environment (see the module docstring)."""

    def __init__(self, curve: ServiceCurve, *, startup_s: float | None = None, max_prefill_tokens: int = 8192,
                 env: simpy.Environment | None = None) -> None:
        self.env = env or simpy.Environment()
        self.curve = curve
        self.max_seqs = curve.max_seqs
        self.rate_tab = curve.rate_table()
        self.startup_s = curve.startup_s if startup_s is None else startup_s
        self.max_prefill_tokens = max_prefill_tokens
        self.queue: deque = deque()
        self.ready: list[Replica] = []
        self.starting: list[Replica] = []
        self.draining: list[Replica] = []
        self.replicas: list[Replica] = []
        self.ttft: list[float] = []
        self.finished = 0
        self.arrived = 0  # requests arrived so far
        self._arrived_mark = 0
        self._seq = 0
        self._rid = 0
        self._prefill_inf = math.isinf(curve.prefill_tokens_per_s) and curve.prefill_overhead_s == 0.0

    # -- replicas ----------------------------------------------------------------------------------

    def add_replicas(self, k: int, delay: float | None = None) -> None:
        """Create ``k`` replicas, ready after ``delay`` (default: ``startup_s``)."""
        delay = self.startup_s if delay is None else delay
        for _ in range(k):
            r = Replica(self._rid, self.env.now)
            self._rid += 1
            self.replicas.append(r)
            if delay <= 0:
                self._on_ready(r)
            else:
                self.starting.append(r)
                ev = self.env.timeout(delay)
                ev.callbacks.append(lambda _e, r=r: self._on_ready(r))

    def remove_replicas(self, k: int) -> None:
        """Remove ``k`` replicas: starting ones (newest first), then idle ready ones, then drain the
        least-occupied ready ones."""
        now = self.env.now
        while k > 0 and self.starting:
            r = self.starting.pop()
            r.state, r.t_gone = GONE, now
            k -= 1
        if k <= 0:
            return
        idle = [r for r in self.ready if r.occ == 0]
        busy = sorted((r for r in self.ready if r.occ > 0), key=lambda r: r.occ)
        for r in (idle + busy)[:k]:
            self.ready.remove(r)
            if r.occ == 0:
                self._retire(r)
            else:
                r.state = DRAINING
                self.draining.append(r)

    def _on_ready(self, r: Replica) -> None:
        if r.state != STARTING:
            return  # removed while starting
        if r in self.starting:
            self.starting.remove(r)
        r.state, r.t_ready = READY, self.env.now
        r.t_last = r.t_occ = self.env.now
        self.ready.append(r)
        q = self.queue
        while q and r.occ < self.max_seqs:
            self._admit(r, q.popleft())

    def _retire(self, r: Replica) -> None:
        self._flush(r, self.env.now)
        r.state, r.t_gone = GONE, self.env.now
        if r in self.draining:
            self.draining.remove(r)

    # -- requests ----------------------------------------------------------------------------------

    def arrive(self, req: list) -> None:
        """A request ``[arrival time, prompt tokens, completion tokens]`` arrives now."""
        self.arrived += 1
        if not self.queue:
            best, bo = None, self.max_seqs
            for r in self.ready:
                if r.occ < bo:
                    best, bo = r, r.occ
            if best is not None:
                self._admit(best, req)
                return
        self.queue.append(req)

    def _occ(self, r: Replica, delta: int) -> None:
        now = self.env.now
        r.slot_s += r.occ * (now - r.t_occ)
        r.t_occ = now
        if r.occ == 0 and delta > 0:
            r.busy_since = now
        r.occ += delta
        if r.occ == 0:
            r.busy_s += now - r.busy_since

    def _admit(self, r: Replica, req: list) -> None:
        self._occ(r, 1)
        r.pq.append(req)
        if not r.prefilling:
            self._start_prefill(r)

    def _start_prefill(self, r: Replica) -> None:
        batch, tokens = [], 0.0
        pq, cap = r.pq, self.max_prefill_tokens
        while pq and (not batch or tokens + pq[0][1] <= cap):
            req = pq.popleft()
            batch.append(req)
            tokens += req[1]
        self._advance(r)
        if self._prefill_inf:
            self._end_prefill(r, batch)
            return
        r.prefilling = True
        r.gen += 1
        r.rate = 0.0
        ev = self.env.timeout(self.curve.prefill_time(tokens))
        ev.callbacks.append(lambda _e: self._end_prefill(r, batch))

    def _end_prefill(self, r: Replica, batch: list) -> None:
        now = self.env.now
        self._advance(r)  # decode was paused (rate 0) during a pass
        r.prefilling = False
        ttft, heap, V = self.ttft, r.heap, r.V
        for req in batch:
            ttft.append(now - req[0])
            self._seq += 1
            heapq.heappush(heap, (V + req[2], self._seq, req))
        if r.pq:
            self._start_prefill(r)
        else:
            self._reschedule(r)

    def _advance(self, r: Replica) -> None:
        now = self.env.now
        if r.rate:
            r.V += r.rate * (now - r.t_last)
        r.t_last = now

    def _reschedule(self, r: Replica) -> None:
        r.gen += 1
        if r.prefilling or not r.heap:
            r.rate = 0.0
            return
        r.rate = rate = self.rate_tab[len(r.heap)]
        dt = (r.heap[0][0] - r.V) / rate
        g = r.gen
        ev = self.env.timeout(dt if dt > 0 else 0.0)
        ev.callbacks.append(lambda _e: self._on_complete(r, g))

    def _on_complete(self, r: Replica, g: int) -> None:
        if g != r.gen:
            return  # superseded by a later change of the replica's batch
        self._advance(r)
        heap = r.heap
        # this event was scheduled for the head's finishing point: it is done, even if the clock
        # moved by less than the float resolution of the time (no zero-progress loop)
        if heap and r.V < heap[0][0]:
            r.V = heap[0][0]
        V = r.V * (1 + 1e-12) + 1e-9
        done = 0
        while heap and heap[0][0] <= V:
            heapq.heappop(heap)
            done += 1
        if done:
            self.finished += done
            self._occ(r, -done)
        if r.state == READY:
            q = self.queue
            while q and r.occ < self.max_seqs:
                self._admit(r, q.popleft())
        elif r.state == DRAINING and r.occ == 0:
            self._retire(r)
            return
        if not r.prefilling:
            self._reschedule(r)

    # -- accounting --------------------------------------------------------------------------------

    def _flush(self, r: Replica, now: float) -> None:
        """Close ``r``'s open occupancy intervals at ``now``."""
        r.slot_s += r.occ * (now - r.t_occ)
        r.t_occ = now
        if r.occ > 0:
            r.busy_s += now - r.busy_since
            r.busy_since = now

    def observe(self, period: float) -> Observation:
        """The pool now, with each ready replica's mean occupancy since the last call."""
        now = self.env.now
        occ, busy = [], []
        for r in self.ready:
            self._flush(r, now)
            span = min(period, now - r.t_ready) if period > 0 else 0.0
            if span > 0:
                occ.append((r.slot_s - r.slot_mark) / span)
                busy.append(min(1.0, (r.busy_s - r.busy_mark) / span))
            else:
                occ.append(float(r.occ))
                busy.append(1.0 if r.occ else 0.0)
            r.slot_mark, r.busy_mark = r.slot_s, r.busy_s
        arrived, self._arrived_mark = self.arrived - self._arrived_mark, self.arrived
        return Observation(now=now, ready=len(self.ready), starting=len(self.starting), queued=len(self.queue),
                           prefill_queued=sum(len(r.pq) for r in self.ready),
                           active=sum(r.occ for r in self.ready), max_seqs=self.max_seqs, occupancy=tuple(occ),
                           busy=tuple(busy), arrived=arrived)

    def totals(self, until: float) -> tuple[float, float, float]:
        """(billed replica-seconds, busy replica-seconds, slot-seconds) in [0, until]; call at ``until``."""
        billed = busy = slots = 0.0
        for r in self.replicas:
            if r.state != GONE:
                self._flush(r, until)
            billed += max(0.0, min(r.t_gone, until) - r.t_created)
            busy += r.busy_s
            slots += r.slot_s
        return billed, busy, slots

    def billed_now(self) -> int:
        return len(self.starting) + len(self.ready) + len(self.draining)

    # -- a day -------------------------------------------------------------------------------------

    def run(self, times: np.ndarray, prompts: np.ndarray, completions: np.ndarray, policy: ScalingPolicy, *,
            until: float, drain_s: float = 3600.0, tier: str = "", metric=None) -> TierRun:
        """Serve the arrivals (sorted ``times``) under ``policy`` until ``until``, then drain."""
        env = self.env
        self.add_replicas(policy.initial(), delay=0.0)
        n = len(times)
        run = TierRun(tier=tier, policy=policy.name, curve=self.curve.name, gpus=self.curve.gpus,
                      gpu_hour_usd=self.curve.gpu_hour_usd, until=until, requests=n, ttft=np.empty(0),
                      replica_s=0.0, busy_s=0.0, slot_s=0.0, max_seqs=self.max_seqs)
        reqs = [[float(t), float(p), float(c)] for t, p, c in zip(times.tolist(), prompts.tolist(), completions.tolist())]

        def arrivals():
            arrive, timeout = self.arrive, env.timeout
            for req in reqs:
                dt = req[0] - env.now
                if dt > 0:
                    yield timeout(dt)
                arrive(req)

        period = policy.sync_period_s

        def scaler():
            while env.now < until:
                obs = self.observe(period)
                want = max(0, int(policy.decide(obs)))
                cur = obs.current
                if want > cur:
                    self.add_replicas(want - cur)
                elif want < cur:
                    self.remove_replicas(cur - want)
                run.series_t.append(env.now)
                run.series_replicas.append(self.billed_now())
                run.series_ready.append(len(self.ready))
                run.series_metric.append(float(metric(obs)) if metric else math.nan)
                yield env.timeout(period)

        env.process(arrivals())
        env.process(scaler())
        env.run(until=until)
        run.replica_s, run.busy_s, run.slot_s = self.totals(until)
        # drain: no more arrivals (all were before `until`); keep the replicas as they are
        deadline = until + drain_s
        while len(self.ttft) < n and env.peek() < deadline:
            env.step()
        got = np.asarray(self.ttft, dtype=float)
        if len(got) < n:
            got = np.concatenate([got, np.full(n - len(got), math.inf)])
        run.ttft = got
        return run


def simulate_tier(curve: ServiceCurve, times: np.ndarray, prompts: np.ndarray, completions: np.ndarray,
                  policy: ScalingPolicy, *, until: float, startup_s: float | None = None, drain_s: float = 3600.0,
                  max_prefill_tokens: int = 8192, tier: str = "", metric=None) -> TierRun:
    """One tier over ``[0, until)`` in a fresh environment (see :class:`TierSim`)."""
    sim = TierSim(curve, startup_s=startup_s, max_prefill_tokens=max_prefill_tokens)
    return sim.run(times, prompts, completions, policy, until=until, drain_s=drain_s, tier=tier, metric=metric)


def percentile(x: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0-100) of ``x``, ``inf`` values included (nan if empty)."""
    a = np.asarray(x, dtype=float)
    if a.size == 0:
        return math.nan
    if np.isfinite(a).all():
        return float(np.percentile(a, q))
    return float(np.percentile(a, q, method="inverted_cdf"))  # no interpolation towards inf
