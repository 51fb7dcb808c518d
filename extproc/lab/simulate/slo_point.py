"""Each tier's SLO point: the highest constant arrival rate a pool of ``n`` static replicas serves
within the TTFT SLO, and what the autoscaling metrics read per pod there.

This is how the example's per-tier autoscaling targets are derived from a tier's service curve:
``n`` replicas (no start-up), Poisson arrivals at a constant rate for ``hours`` simulated hours
with the tier's token distributions, the rate found by doubling and then bisection on whether the
``quantile`` TTFT is within ``slo_s``. At that rate it reports the mean, over the syncs, of
requests in flight per pod (the ``inflight`` policy's metric), requests waiting per pod (the
``queue`` policy's) and the CPU the :class:`~.autoscalers.CpuModel` reads (the ``cpu`` policy's).

    extproc simulate extproc/lab/simulate/examples/day.yaml --slo-points 1,2,3,4
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from extproc.lab.simulate.autoscalers import CpuModel, StaticPolicy, inflight_values, pending_values
from extproc.lab.simulate.model import Observation, percentile, simulate_tier
from extproc.lab.simulate.service_curves import ServiceCurve
from extproc.lab.simulate.workload import TierMix, constant_arrivals


@dataclass(frozen=True)
class SloPoint:
    """One tier's SLO point with ``replicas`` static replicas."""

    replicas: int
    rate_rps: float  #: the highest rate found within the SLO (0 if even a trickle misses it)
    ttft_s: float  #: the TTFT quantile at that rate
    inflight_per_pod: float
    waiting_per_pod: float
    cpu_utilisation: float


class _Recorder(StaticPolicy):
    """Static replicas that record the per-pod metrics at every sync."""

    def __init__(self, replicas: int, cpu: CpuModel, sync_period_s: float) -> None:
        super().__init__(replicas, sync_period_s=sync_period_s)
        self.cpu = cpu
        self.inflight: list[float] = []
        self.waiting: list[float] = []
        self.cpu_reads: list[float] = []

    def decide(self, obs: Observation) -> int:
        if obs.ready:
            self.inflight.append(float(np.mean(inflight_values(obs))))
            self.waiting.append(float(np.mean(pending_values(obs))))
            busy = obs.busy or tuple(1.0 if o > 0 else 0.0 for o in obs.occupancy)
            self.cpu_reads.append(float(np.mean([self.cpu.utilisation(o, obs.max_seqs, b)
                                                 for o, b in zip(obs.occupancy, busy)])))
        return self.replicas


def _measure(curve: ServiceCurve, mix: TierMix, replicas: int, rate: float, *, hours: float, seed: int,
             quantile: float, cpu: CpuModel, sync_period_s: float, max_prefill_tokens: int) -> SloPoint:
    horizon = hours * 3600.0
    rng = np.random.default_rng(seed)
    t = constant_arrivals(rate, 0.0, horizon, rng)
    prompts, completions = mix.prompt.sample(rng, len(t)), mix.completion.sample(rng, len(t))
    rec = _Recorder(replicas, cpu, sync_period_s)
    run = simulate_tier(curve, t, prompts, completions, rec, until=horizon, startup_s=0.0,
                        max_prefill_tokens=max_prefill_tokens)
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    return SloPoint(replicas, rate, percentile(run.ttft, quantile) if len(t) else 0.0, mean(rec.inflight),
                    mean(rec.waiting), mean(rec.cpu_reads))


def slo_point(curve: ServiceCurve, mix: TierMix, replicas: int, *, slo_s: float, quantile: float = 95.0,
              hours: float = 4.0, seed: int = 1, iterations: int = 9, cpu: CpuModel = CpuModel(),
              sync_period_s: float = 15.0, max_prefill_tokens: int = 8192, max_rate_rps: float = 1e4) -> SloPoint:
    """The SLO point of ``replicas`` static replicas of ``curve`` for ``mix``'s requests (see the module
    docstring). The same arrivals' random stream (``seed``) is used at every rate tried."""
    kw = dict(hours=hours, seed=seed, quantile=quantile, cpu=cpu, sync_period_s=sync_period_s,
              max_prefill_tokens=max_prefill_tokens)

    def ok(rate: float) -> bool:
        return _measure(curve, mix, replicas, rate, **kw).ttft_s <= slo_s

    lo, hi = 0.0, 0.1 * replicas
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > max_rate_rps:
            return _measure(curve, mix, replicas, lo, **kw)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    if lo == 0.0:
        return SloPoint(replicas, 0.0, float("nan"), 0.0, 0.0, cpu.idle)
    return _measure(curve, mix, replicas, lo, **kw)


__all__ = ["SloPoint", "slo_point"]
