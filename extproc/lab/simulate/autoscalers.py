"""Scaling policies: static provisioning for the peak, and Kubernetes' HorizontalPodAutoscaler on
CPU utilisation or on queue depth.

The HPA (:class:`Hpa`) follows the Kubernetes documentation ("Horizontal Pod Autoscaling",
https://kubernetes.io/docs/concepts/workloads/autoscaling/horizontal-pod-autoscale/, sections
"Algorithm details", "Stabilization window", "Default Behavior") and the controller's replica
calculator:

* The controller runs every ``--horizontal-pod-autoscaler-sync-period`` (default **15 s**).
* ``desiredReplicas = ceil[currentReplicas × (currentMetricValue / desiredMetricValue)]``, the
  metric being the mean over the ready pods; if the ratio is within the **tolerance** (default
  **0.1**, ``--horizontal-pod-autoscaler-tolerance``) of 1.0, the controller does not scale.
* Pods not yet ready (here: starting) are set aside; if the ratio says *scale up* and there are
  such pods, they are assumed to use **0 %** of the target and the ratio is recomputed over all
  pods; if that reverses the direction or falls within the tolerance, nothing changes. (Kubernetes
  applies the readiness rule to CPU, and treats Pending pods as unready for every metric; a
  starting Triton pod is taken as unready for both metrics here.)
* **Stabilization window**: the controller keeps its recommendations; scaling up uses the
  lowest recommendation of the last ``scaleUp.stabilizationWindowSeconds`` (default **0 s**),
  scaling down the highest of the last ``scaleDown.stabilizationWindowSeconds`` (default
  **300 s**).
* **Scaling policies** (default behaviour): up by at most ``max(100 %, 4 pods)`` per 15 s, down
  by at most 100 % per 15 s (``selectPolicy: Max``), then ``minReplicas``/``maxReplicas``.
* New pods serve after the pod start-up delay (the model's ``startup_s``).

Metrics:

* **queue depth**: requests waiting per ready pod (``nv_inference_pending_request_count``-like:
  waiting for a slot or for their prefill pass), against an ``averageValue`` target;
* **CPU utilisation** (:class:`CpuModel`): an inference server's CPU is busy whatever the load
  (the serving loop, the response sender, polling the GPU), plus a small share per active
  sequence (tokenising, detokenising, streaming), capped at the pod's limit:
  ``min(cap, base + per_seq_share × occupied_slots / max_seqs)``. Assumed, not measured: the point
  is its shape. Because CPU moves little with load, the HPA's ±10 % band on CPU is a wide band on
  load (from ``base`` to ``cap`` spans every occupancy), and the scale-up ratio can never exceed
  ``cap / target``: with ``target >= cap / 1.1`` it never scales up at all; with ``base`` near the
  target it never scales down.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from extproc.lab.simulate.model import Observation, percentile, simulate_tier
from extproc.lab.simulate.service_curves import ServiceCurve


@dataclass(frozen=True)
class ScalingRule:
    """One HPA scaling policy: ``kind`` "Pods" or "Percent", ``value``, per ``period_s``."""

    kind: str
    value: float
    period_s: float

    def __post_init__(self) -> None:
        if self.kind not in ("Pods", "Percent"):
            raise ValueError(f"kind: {self.kind!r} is not Pods or Percent")


@dataclass(frozen=True)
class HpaConfig:
    """The HPA's parameters, with the Kubernetes defaults."""

    sync_period_s: float = 15.0
    tolerance: float = 0.1
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 300.0
    min_replicas: int = 1
    max_replicas: int = 100
    scale_up_rules: tuple[ScalingRule, ...] = (ScalingRule("Percent", 100, 15), ScalingRule("Pods", 4, 15))
    scale_up_select: str = "Max"
    scale_down_rules: tuple[ScalingRule, ...] = (ScalingRule("Percent", 100, 15),)
    scale_down_select: str = "Max"

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("min_replicas/max_replicas: need 1 <= min_replicas <= max_replicas")
        if self.sync_period_s <= 0 or self.tolerance < 0:
            raise ValueError("sync_period_s must be > 0 and tolerance >= 0")
        for sel in (self.scale_up_select, self.scale_down_select):
            if sel not in ("Max", "Min", "Disabled"):
                raise ValueError(f"select: {sel!r} is not Max, Min or Disabled")


def replica_count(ready_values: Sequence[float], unready: int, current: int, target: float,
                  tolerance: float = 0.1) -> int:
    """The HPA replica calculator for an average-value metric (the controller's
    ``calcPlainMetricReplicas``): ``ready_values`` the metric of each ready pod, ``unready`` pods
    without a usable value (starting), ``current`` the workload's replicas."""
    n = len(ready_values)
    if n == 0 or target <= 0:
        return current  # no metrics: the controller does not scale
    total = float(sum(ready_values))
    ratio = total / n / target
    if not (unready > 0 and ratio > 1.0):
        if abs(1.0 - ratio) <= tolerance:
            return current
        return int(math.ceil(ratio * n))
    # scale-up with unready pods: they count as using 0 of the metric
    new_ratio = total / (n + unready) / target
    if abs(1.0 - new_ratio) <= tolerance or new_ratio < 1.0:
        return current
    new = int(math.ceil(new_ratio * (n + unready)))
    return current if new < current else new


class Hpa:
    """A HorizontalPodAutoscaler's decision loop for one workload (see the module docstring)."""

    def __init__(self, config: HpaConfig, target: float) -> None:
        self.config = config
        self.target = target
        self._recs: deque[tuple[float, int]] = deque()  # (time, unstabilised recommendation)
        self._events: deque[tuple[float, int]] = deque()  # (time, replicas added (+) / removed (-))

    def stabilize(self, now: float, current: int, desired: int) -> int:
        """Apply the stabilization windows to ``desired`` and record it."""
        c = self.config
        up, down = desired, desired
        for t, rec in self._recs:
            if t > now - c.scale_up_stabilization_s:
                up = min(up, rec)
            if t > now - c.scale_down_stabilization_s:
                down = max(down, rec)
        out = current
        if out < up:
            out = up
        if out > down:
            out = down
        self._recs.append((now, desired))
        horizon = max(c.scale_up_stabilization_s, c.scale_down_stabilization_s)
        while self._recs and self._recs[0][0] <= now - horizon:
            self._recs.popleft()
        return out

    def _changes(self, now: float, period: float) -> tuple[int, int]:
        added = sum(d for t, d in self._events if d > 0 and t > now - period)
        removed = -sum(d for t, d in self._events if d < 0 and t > now - period)
        return added, removed

    def rate_limit(self, now: float, current: int, desired: int) -> int:
        """Apply the scaling policies and ``min``/``maxReplicas`` (``convertDesiredReplicasWithBehaviorRate``)."""
        c = self.config
        if desired > current:
            if c.scale_up_select == "Disabled":
                limit = current
            else:
                props = []
                for rule in c.scale_up_rules:
                    added, removed = self._changes(now, rule.period_s)
                    start = current - added + removed
                    props.append(start + rule.value if rule.kind == "Pods"
                                 else math.ceil(start * (1 + rule.value / 100.0)))
                limit = int(max(props) if c.scale_up_select == "Max" else min(props))
            limit = max(limit, current)
            desired = min(desired, limit, c.max_replicas)
        elif desired < current:
            if c.scale_down_select == "Disabled":
                limit = current
            else:
                props = []
                for rule in c.scale_down_rules:
                    added, removed = self._changes(now, rule.period_s)
                    start = current + removed - added
                    props.append(start - rule.value if rule.kind == "Pods"
                                 else int(start * (1 - rule.value / 100.0)))
                limit = int(min(props) if c.scale_down_select == "Max" else max(props))
            limit = min(limit, current)
            desired = max(desired, limit, c.min_replicas)
        return max(c.min_replicas, min(c.max_replicas, desired))

    def step(self, now: float, current: int, ready_values: Sequence[float], unready: int) -> int:
        """One sync: the replica count the HPA sets now."""
        c = self.config
        if current == 0:
            return 0  # scaling is disabled for a workload scaled to zero
        desired = replica_count(ready_values, unready, current, self.target, c.tolerance)
        desired = self.stabilize(now, current, desired)
        out = self.rate_limit(now, current, desired)
        if out != current:
            self._events.append((now, out - current))
            horizon = max([r.period_s for r in c.scale_up_rules + c.scale_down_rules] or [0.0])
            while self._events and self._events[0][0] <= now - horizon:
                self._events.popleft()
        return out


@dataclass(frozen=True)
class CpuModel:
    """A pod's CPU utilisation (of its CPU request) over a sync period (assumed shape).

    ``idle + (busy - idle) × busy_share + per_seq_share × occupancy / max_seqs``, capped at
    ``cap``: ``busy_share`` is the part of the period the pod had at least one sequence. An
    inference server's serving loop polls the GPU and spins as soon as there is any work (one core
    busy whatever the batch), the per-sequence work (tokenising, detokenising, streaming) adds
    little. So CPU tells "busy or not", and barely how much.
    """

    idle: float = 0.10
    busy: float = 0.80
    per_seq_share: float = 0.10
    cap: float = 1.0

    def utilisation(self, occupied: float, max_seqs: int, busy_share: float = 1.0) -> float:
        u = self.idle + (self.busy - self.idle) * busy_share + self.per_seq_share * occupied / max_seqs
        return min(self.cap, u)


# --- policies -------------------------------------------------------------------------------------


@dataclass
class StaticPolicy:
    """A fixed replica count all day."""

    replicas: int
    name: str = "static"
    sync_period_s: float = 15.0

    def initial(self) -> int:
        return self.replicas

    def decide(self, obs: Observation) -> int:
        return self.replicas


def pending_values(obs: Observation) -> list[float]:
    """Queue depth per ready pod: the tier queue shared out, plus each pod's own prefill queue
    (their mean is what the HPA compares with the target)."""
    if obs.ready == 0:
        return []
    per = obs.pending / obs.ready
    return [per] * obs.ready


@dataclass
class HpaPolicy:
    """The HPA on a per-pod metric: ``values(obs)`` gives each ready pod's value."""

    name: str
    hpa: Hpa
    values: Callable[[Observation], Sequence[float]]
    initial_replicas: int | None = None
    sync_period_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.sync_period_s = self.hpa.config.sync_period_s

    def initial(self) -> int:
        return self.initial_replicas or self.hpa.config.min_replicas

    def decide(self, obs: Observation) -> int:
        return self.hpa.step(obs.now, obs.current, self.values(obs), obs.starting)

    def metric(self, obs: Observation) -> float:
        v = self.values(obs)
        return float(np.mean(v)) if len(v) else math.nan


def inflight_values(obs: Observation) -> list[float]:
    """Requests waiting or being served per ready pod (a concurrency metric)."""
    if obs.ready == 0:
        return []
    per = (obs.pending + obs.active - obs.prefill_queued) / obs.ready  # active already counts prefill_queued
    return [per] * obs.ready


def queue_policy(config: HpaConfig, target: float, initial: int | None = None) -> HpaPolicy:
    """The HPA on queue depth: mean pending requests per ready pod against ``target``."""
    return HpaPolicy("queue", Hpa(config, target), pending_values, initial)


def inflight_policy(config: HpaConfig, target: float, initial: int | None = None) -> HpaPolicy:
    """The HPA on requests in flight (waiting or being served) per ready pod against ``target``
    (a concurrency target, as Knative's and KServe's autoscalers use)."""
    return HpaPolicy("inflight", Hpa(config, target), inflight_values, initial)


def cpu_policy(config: HpaConfig, target_utilisation: float, cpu: CpuModel = CpuModel(),
               initial: int | None = None) -> HpaPolicy:
    """The HPA on CPU utilisation (``averageUtilization``) of the :class:`CpuModel`."""
    def values(obs: Observation) -> list[float]:
        busy = obs.busy or tuple(1.0 if o > 0 else 0.0 for o in obs.occupancy)
        return [cpu.utilisation(o, obs.max_seqs, b) for o, b in zip(obs.occupancy, busy)]
    return HpaPolicy("cpu", Hpa(config, target_utilisation), values, initial)


@dataclass
class ScaleToZero:
    """KEDA's activation phase around an HPA policy (a ScaledObject with ``minReplicaCount: 0``).

    KEDA (https://keda.sh/docs/latest/concepts/scaling-deployments/, "Activating and Scaling
    thresholds", ``cooldownPeriod``) polls every ``pollingInterval``: a trigger is *active* when its
    value is above ``activationThreshold``. A workload at 0 replicas goes to 1 as soon as a poll is
    active (the HPA takes over from there, with ``minReplicas`` 1); one that has not been active
    for ``cooldownPeriod`` (default 300 s) goes to 0, whatever the HPA says. Between the two the
    HPA decides alone.

    The activation value here is what a gateway-side query sees (Triton's own gauges vanish with
    the last pod): requests in flight at the poll, the tier queue included, plus the requests that
    arrived since the previous poll (``increase(requests_total[15s])``), so a tier whose requests
    are shorter than the poll interval is not taken for empty. A request that finds no replica
    waits in the tier queue for a pod's whole start-up: its TTFT pays the cold start.
    """

    inner: HpaPolicy
    activation_threshold: float = 0.0
    cooldown_s: float = 300.0
    name: str = field(init=False)
    sync_period_s: float = field(init=False)
    _last_active: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.activation_threshold < 0 or self.cooldown_s < 0:
            raise ValueError("activation_threshold and cooldown_s must be >= 0")
        self.name = self.inner.name
        self.sync_period_s = self.inner.sync_period_s

    def initial(self) -> int:
        return self.inner.initial()

    def activation_value(self, obs: Observation) -> float:
        """Requests in flight (queued or on a replica) plus those arrived since the last poll."""
        return float(obs.queued + obs.active + obs.arrived)

    def decide(self, obs: Observation) -> int:
        active = self.activation_value(obs) > self.activation_threshold
        if active:
            self._last_active = obs.now
        if obs.current == 0:
            return 1 if active else 0
        if not active and obs.now - self._last_active >= self.cooldown_s:
            return 0
        return self.inner.decide(obs)

    def metric(self, obs: Observation) -> float:
        return self.inner.metric(obs)


# --- static provisioning for the peak -------------------------------------------------------------


@dataclass(frozen=True)
class StaticSizing:
    """The result of :func:`size_static`."""

    replicas: int
    p95_ttft_s: float
    met: bool  #: False if even ``max_replicas`` missed the SLO
    tried: tuple[tuple[int, float], ...]  #: (replicas, p95 TTFT) of every window simulated


def size_static(curve: ServiceCurve, times: np.ndarray, prompts: np.ndarray, completions: np.ndarray, *,
                slo_s: float, quantile: float = 95.0, max_replicas: int = 100, drain_s: float = 1800.0,
                max_prefill_tokens: int = 8192) -> StaticSizing:
    """The smallest replica count whose ``quantile`` TTFT over the arrivals (a window around the
    peak, times from 0) is within ``slo_s``: doubling, then bisection (simulated with the same
    arrivals each time)."""
    until = float(times[-1]) + 1e-6 if len(times) else 1.0
    cache: dict[int, float] = {}

    def p(n: int) -> float:
        if n not in cache:
            run = simulate_tier(curve, times, prompts, completions, StaticPolicy(n), until=until,
                                startup_s=0.0, drain_s=drain_s, max_prefill_tokens=max_prefill_tokens)
            cache[n] = percentile(run.ttft, quantile)
        return cache[n]

    hi = 1
    while p(hi) > slo_s and hi < max_replicas:
        hi = min(max_replicas, hi * 2)
    if p(hi) > slo_s:
        return StaticSizing(hi, p(hi), False, tuple(sorted(cache.items())))
    lo = hi // 2  # p(lo) > slo (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if p(mid) <= slo_s:
            hi = mid
        else:
            lo = mid
    return StaticSizing(hi, p(hi), True, tuple(sorted(cache.items())))


__all__ = ["ScalingRule", "HpaConfig", "replica_count", "Hpa", "CpuModel", "StaticPolicy", "HpaPolicy",
           "ScaleToZero", "pending_values", "inflight_values", "queue_policy", "inflight_policy", "cpu_policy", "StaticSizing", "size_static"]
