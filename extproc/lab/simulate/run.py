"""``extproc simulate``: a day of traffic at each scale, for static provisioning for the peak,
CPU-based and queue-depth autoscaling; tables in the terminal and a JSON file.

:func:`simulate` runs a :class:`~.config.SimConfig` and returns a :class:`SimResult`: per policy
and scale, replicas over the day, GPU-hours per day, cost per request (GPU-hours × price /
requests), p50/p95 TTFT, the share of requests within the TTFT SLO and the idle capacity share
(replica-seconds not serving any sequence, start-up included, / replica-seconds billed).

Each (scale, tier, policy) is simulated on its own (tiers are independent pools), with the same
arrivals for every policy at a scale (common random numbers: seeded by the seed, the scale and
the tier), in worker processes. Static provisioning sizes each tier on the busiest
``static.peak_window_s`` of the day (the smallest count whose p95 TTFT there meets the SLO).

    extproc simulate extproc/lab/simulate/examples/day.yaml --out sim.json
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from extproc.lab.simulate.autoscalers import (CpuModel, HpaConfig, HpaPolicy, ScaleToZero, ScalingRule,
                                              StaticPolicy, cpu_policy, inflight_policy, queue_policy, size_static)
from extproc.lab.simulate.config import ConfigError, SimConfig
from extproc.lab.simulate.model import TierRun, percentile, simulate_tier
from extproc.lab.simulate.service_curves import (MEASURED_REFERENCE, ServiceCurve, curves_from_bench, load_bench,
                                                 load_profiles)
from extproc.lab.simulate.workload import Diurnal, TierMix, TokenDist, WorkloadMix, arrival_times, load_mix

EXAMPLE = Path(__file__).resolve().parent / "examples" / "day.yaml"


@dataclass(frozen=True)
class TierSpec:
    """A tier ready to simulate: its replica curve and its part of the mix."""

    name: str
    index: int
    curve: ServiceCurve
    mix: TierMix
    share: float


def tier_specs(config: SimConfig) -> list[TierSpec]:
    """Resolve every tier's curve (profile or measured) and mix (config or ``mix_file``)."""
    profiles = load_profiles(config.path(config.profiles_file) if config.profiles_file else None)
    measured: dict[str, ServiceCurve] = {}
    if any(t.measured for t in config.tiers.values()):
        m = config.measured
        cells = load_bench(config.path(config.curves_file) if config.curves_file else MEASURED_REFERENCE)
        measured = curves_from_bench(cells, max_seqs=m.max_seqs, replica_hour_usd=m.replica_hour_usd,
                                     startup_s=m.startup_s, prefill_tokens_per_s=m.prefill_tokens_per_s)
    mix_file = load_mix(config.path(config.mix_file)) if config.mix_file else None
    if mix_file:
        extra = set(mix_file.tiers) - set(config.tiers)
        if extra:
            raise ConfigError(f"mix_file: tier(s) {', '.join(sorted(extra))} have no entry under tiers")
    mixes = {}
    for name, t in config.tiers.items():
        if mix_file and name in mix_file.tiers:
            mixes[name] = mix_file.tiers[name]
            continue
        if mix_file:
            mixes[name] = TierMix(0.0, TokenDist("constant", 1.0), TokenDist("constant", 1.0))
            continue
        for key in ("share", "prompt_tokens", "completion_tokens"):
            if getattr(t, key) is None:
                raise ConfigError(f"tiers.{name}.{key}: required (or give mix_file)")
        try:
            mixes[name] = TierMix(t.share, TokenDist.from_mapping(t.prompt_tokens, f"tiers.{name}.prompt_tokens"),
                                  TokenDist.from_mapping(t.completion_tokens, f"tiers.{name}.completion_tokens"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    try:
        mix = WorkloadMix(mixes, config.mix_file or "config")
    except ValueError as exc:
        raise ConfigError(f"tiers: {exc}") from None
    specs = []
    for i, (name, t) in enumerate(config.tiers.items()):
        if t.profile is not None:
            if t.profile not in profiles:
                raise ConfigError(f"tiers.{name}.profile: {t.profile!r} is not one of {', '.join(profiles)}")
            curve = profiles[t.profile]
        else:
            if t.measured not in measured:
                raise ConfigError(f"tiers.{name}.measured: {t.measured!r} is not one of {', '.join(measured)}")
            curve = measured[t.measured]
        curve = curve.with_overrides(gpu_hour_usd=t.gpu_hour_usd, startup_s=t.startup_s, max_seqs=t.max_seqs)
        specs.append(TierSpec(name, i, curve, mix.tiers[name], mix.share(name)))
    return specs


def busiest_window(diurnal: Diurnal, width_s: float, step_s: float = 60.0) -> float:
    """Start of the ``width_s`` window with the most expected arrivals (on a ``step_s`` grid)."""
    t = np.arange(0.0, diurnal.day_s, step_s)
    f = diurnal.factor(t)
    k = max(1, int(round(width_s / step_s)))
    ext = np.concatenate([f, f[:k]])
    sums = np.convolve(ext, np.ones(k), mode="valid")[: len(t)]
    return float(t[int(np.argmax(sums))])


def _rng(config: SimConfig, scale: float, tier_index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([config.seed, int(round(scale * 1000)), tier_index, stream]))


def tier_arrivals(config: SimConfig, spec: TierSpec, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tier's day at ``scale``: arrival times, prompt and completion tokens (same for every policy)."""
    day_s = config.day_hours * 3600.0
    diurnal = Diurnal(config.diurnal, day_s)
    rng = _rng(config, scale, spec.index, 0)
    t = arrival_times(config.base_rate_rps * scale * spec.share, diurnal, 0.0, day_s, rng)
    return t, spec.mix.prompt.sample(rng, len(t)), spec.mix.completion.sample(rng, len(t))


def hpa_config(config: SimConfig) -> HpaConfig:
    h = config.hpa
    return HpaConfig(sync_period_s=h.sync_period_s, tolerance=h.tolerance,
                     scale_up_stabilization_s=h.scale_up_stabilization_s,
                     scale_down_stabilization_s=h.scale_down_stabilization_s,
                     min_replicas=h.min_replicas, max_replicas=h.max_replicas,
                     scale_up_rules=tuple(ScalingRule(r.type, r.value, r.period_s) for r in h.scale_up_policies),
                     scale_up_select=h.scale_up_select,
                     scale_down_rules=tuple(ScalingRule(r.type, r.value, r.period_s) for r in h.scale_down_policies),
                     scale_down_select=h.scale_down_select)


def tier_target(config: SimConfig, tier: str, policy_name: str) -> float:
    """The autoscaling target of ``policy_name`` for ``tier``: its ``per_tier`` entry, else the policy's."""
    settings = getattr(config, policy_name)
    return settings.per_tier.get(tier, settings.target)


def autoscaler(config: SimConfig, tier: str, policy_name: str) -> HpaPolicy | ScaleToZero:
    """The HPA of ``policy_name`` (cpu, queue, inflight) for ``tier``, inside KEDA's scale to zero
    when the tier is listed under ``scale_to_zero.tiers``."""
    target = tier_target(config, tier, policy_name)
    if policy_name == "cpu":
        c = config.cpu
        policy = cpu_policy(hpa_config(config), target, CpuModel(c.idle, c.busy, c.per_seq_share, c.cap))
    elif policy_name == "queue":
        policy = queue_policy(hpa_config(config), target)
    else:
        policy = inflight_policy(hpa_config(config), target)
    z = config.scale_to_zero
    if tier in z.tiers:
        return ScaleToZero(policy, activation_threshold=z.activation_threshold, cooldown_s=z.cooldown_s)
    return policy


def run_tier(config: SimConfig, spec: TierSpec, scale: float, policy_name: str) -> dict[str, Any]:
    """Simulate one tier's day at ``scale`` under one policy; a plain dict (for the pool)."""
    t0 = time.perf_counter()
    day_s = config.day_hours * 3600.0
    times, prompts, completions = tier_arrivals(config, spec, scale)
    sizing = None
    metric = None
    if policy_name == "static":
        diurnal = Diurnal(config.diurnal, day_s)
        width = min(config.static.peak_window_s, day_s)
        start = busiest_window(diurnal, width, step_s=min(60.0, width / 10))
        if start + width <= day_s:
            sel = (times >= start) & (times < start + width)
            wt = times[sel] - start
        else:  # the window wraps around midnight
            sel = (times >= start) | (times < start + width - day_s)
            wt = np.where(times >= start, times - start, times + day_s - start)[sel]
            order = np.argsort(wt)
            wt, sel = wt[order], np.flatnonzero(sel)[order]
        s = size_static(spec.curve, wt, prompts[sel], completions[sel], slo_s=config.slo_ttft_s,
                        quantile=config.slo_quantile, max_replicas=config.hpa.max_replicas,
                        max_prefill_tokens=config.max_prefill_tokens)
        sizing = {"replicas": s.replicas, "p95_ttft_s": s.p95_ttft_s, "met": s.met, "window_start_s": start,
                  "window_s": width, "tried": [list(x) for x in s.tried]}
        policy = StaticPolicy(s.replicas, sync_period_s=config.hpa.sync_period_s)
    elif policy_name in ("cpu", "queue", "inflight"):
        policy = autoscaler(config, spec.name, policy_name)
        metric = policy.metric
    else:
        raise ConfigError(f"policies: unknown policy {policy_name!r}")
    run = simulate_tier(spec.curve, times, prompts, completions, policy, until=day_s, drain_s=config.drain_s,
                        max_prefill_tokens=config.max_prefill_tokens, tier=spec.name, metric=metric)
    return {"tier": spec.name, "scale": scale, "policy": policy_name, "run": _compact(run, config),
            "sizing": sizing, "seconds": time.perf_counter() - t0}


def _compact(run: TierRun, config: SimConfig) -> dict[str, Any]:
    step = config.series_step_s
    t = np.asarray(run.series_t)
    idx = np.searchsorted(t, np.arange(0.0, run.until, step)) if len(t) else np.array([], dtype=int)
    idx = idx[idx < len(t)]
    reps = np.asarray(run.series_replicas)
    return {
        "tier": run.tier, "curve": run.curve, "gpus": run.gpus, "gpu_hour_usd": run.gpu_hour_usd,
        "requests": run.requests, "ttft": run.ttft.astype(np.float32), "replica_s": run.replica_s,
        "busy_s": run.busy_s, "slot_s": run.slot_s, "max_seqs": run.max_seqs,
        "replicas_max": int(reps.max()) if len(reps) else 0, "replicas_min": int(reps.min()) if len(reps) else 0,
        "series_t": t[idx].tolist(), "series_replicas": reps[idx].tolist() if len(reps) else [],
        "series_metric": [None if math.isnan(x) else round(x, 4) for x in np.asarray(run.series_metric)[idx].tolist()],
    }


# --- results --------------------------------------------------------------------------------------


@dataclass
class PolicyResult:
    """One policy at one scale, all tiers together (``tiers``: the same per tier)."""

    policy: str
    scale: float
    requests: int
    gpu_hours: float
    cost_usd: float
    cost_per_request: float
    p50_ttft_s: float
    p95_ttft_s: float
    slo_share: float  #: requests whose TTFT is within the SLO
    worst_tier_p95_ttft_s: float  #: the highest per-tier p95 TTFT (each tier is its own pool and SLO)
    idle_share: float  #: replica-seconds with no sequence / replica-seconds billed
    slot_utilisation: float  #: occupied slot-seconds / (replica-seconds × max_seqs)
    replicas_mean: float
    replicas_max: int
    series_t: list[float] = field(default_factory=list)
    series_replicas: list[int] = field(default_factory=list)
    tiers: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class SimResult:
    """Every (policy, scale) of a simulation, with the configuration it ran."""

    config: dict[str, Any]
    results: list[PolicyResult]
    seconds: float = 0.0

    def get(self, policy: str, scale: float) -> PolicyResult:
        for r in self.results:
            if r.policy == policy and math.isclose(r.scale, scale):
                return r
        raise KeyError((policy, scale))

    def saving(self, policy: str, scale: float, baseline: str = "static") -> float:
        """GPU-hours saved by ``policy`` against ``baseline`` at ``scale`` (0.3 = 30 % fewer)."""
        return 1.0 - self.get(policy, scale).gpu_hours / self.get(baseline, scale).gpu_hours

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "seconds": round(self.seconds, 2), "results": [asdict(r) for r in self.results]}


def _stats(ttft: np.ndarray, slo: float) -> tuple[float, float, float]:
    if ttft.size == 0:
        return math.nan, math.nan, math.nan
    return percentile(ttft, 50), percentile(ttft, 95), float(np.mean(ttft <= slo))


def _aggregate(policy: str, scale: float, parts: list[dict[str, Any]], config: SimConfig) -> PolicyResult:
    slo = config.slo_ttft_s
    tiers = {}
    all_ttft, series = [], None
    gpu_h = cost = rep_s = busy_s = slot_cap = slot_s = 0.0
    requests = 0
    for p in parts:
        r = p["run"]
        ttft = np.asarray(r["ttft"], dtype=float)
        p50, p95, share = _stats(ttft, slo)
        g = r["replica_s"] * r["gpus"] / 3600.0
        c = g * r["gpu_hour_usd"]
        tiers[r["tier"]] = {
            "curve": r["curve"], "requests": r["requests"], "gpu_hours": g, "cost_usd": c,
            "cost_per_request": c / r["requests"] if r["requests"] else math.nan,
            "p50_ttft_s": p50, "p95_ttft_s": p95, "slo_share": share,
            "idle_share": 1.0 - r["busy_s"] / r["replica_s"] if r["replica_s"] else math.nan,
            "slot_utilisation": r["slot_s"] / (r["replica_s"] * r["max_seqs"]) if r["replica_s"] else math.nan,
            "replicas_mean": r["replica_s"] / (config.day_hours * 3600.0), "replicas_max": r["replicas_max"],
            "static_sizing": p["sizing"], "series_t": r["series_t"], "series_replicas": r["series_replicas"],
            "series_metric": r["series_metric"], "sim_seconds": round(p["seconds"], 2),
        }
        all_ttft.append(ttft)
        requests += r["requests"]
        gpu_h += g
        cost += c
        rep_s += r["replica_s"]
        busy_s += r["busy_s"]
        slot_s += r["slot_s"]
        slot_cap += r["replica_s"] * r["max_seqs"]
        reps = np.asarray(r["series_replicas"])
        series = reps if series is None else series[: len(reps)] + reps[: len(series)]
    ttft = np.concatenate(all_ttft) if all_ttft else np.empty(0)
    p50, p95, share = _stats(ttft, slo)
    t = parts[0]["run"]["series_t"][: len(series)] if parts else []
    return PolicyResult(
        policy=policy, scale=scale, requests=requests, gpu_hours=gpu_h, cost_usd=cost,
        cost_per_request=cost / requests if requests else math.nan, p50_ttft_s=p50, p95_ttft_s=p95,
        slo_share=share,
        worst_tier_p95_ttft_s=max((t["p95_ttft_s"] for t in tiers.values()), default=math.nan),
        idle_share=1.0 - busy_s / rep_s if rep_s else math.nan,
        slot_utilisation=slot_s / slot_cap if slot_cap else math.nan,
        replicas_mean=rep_s / (config.day_hours * 3600.0),
        replicas_max=int(series.max()) if series is not None and len(series) else 0,
        series_t=list(t), series_replicas=[int(x) for x in series] if series is not None else [], tiers=tiers)


def simulate(config: SimConfig, *, progress: Callable[[dict[str, Any]], None] | None = None) -> SimResult:
    """Run every (scale, tier, policy) of ``config`` (in ``config.workers`` processes, default one per
    core; ``progress`` is called with each finished part)."""
    t0 = time.perf_counter()
    specs = tier_specs(config)
    tasks = [(s, spec, pol) for s in sorted(config.scales, reverse=True) for spec in specs for pol in config.policies]
    # the biggest first: static (several sizing runs), then the others
    tasks.sort(key=lambda x: (-x[0] * x[1].share, x[2] != "static"))
    workers = config.workers or os.cpu_count() or 1
    out: list[dict[str, Any]] = []
    if workers <= 1 or len(tasks) == 1:
        for s, spec, pol in tasks:
            out.append(run_tier(config, spec, s, pol))
            if progress:
                progress(out[-1])
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            futures = [pool.submit(run_tier, config, spec, s, pol) for s, spec, pol in tasks]
            for f in futures:
                out.append(f.result())
                if progress:
                    progress(out[-1])
    results = []
    for s in config.scales:
        for pol in config.policies:
            parts = [o for o in out if o["policy"] == pol and math.isclose(o["scale"], s)]
            parts.sort(key=lambda o: list(config.tiers).index(o["tier"]))
            results.append(_aggregate(pol, s, parts, config))
    cfg = config.model_dump()
    cfg["curves"] = {sp.name: {"curve": sp.curve.name, "gpus": sp.curve.gpus, "gpu_hour_usd": sp.curve.gpu_hour_usd,
                               "max_seqs": sp.curve.max_seqs, "startup_s": sp.curve.startup_s,
                               "peak_tokens_per_s": sp.curve.peak_tokens_per_s, "share": sp.share,
                               "sources": dict(sp.curve.sources)} for sp in specs}
    return SimResult(cfg, results, time.perf_counter() - t0)
