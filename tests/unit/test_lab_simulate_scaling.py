"""The capacity simulator's scale to zero (KEDA's activation phase around the HPA) and per-tier
autoscaling targets (extproc/lab/simulate)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("simpy")

from extproc.lab.simulate.autoscalers import (HpaConfig, HpaPolicy, ScaleToZero, StaticPolicy, inflight_policy)
from extproc.lab.simulate.config import ConfigError, parse_config
from extproc.lab.simulate.model import Observation, TierSim, simulate_tier
from extproc.lab.simulate.run import autoscaler, tier_target
from extproc.lab.simulate.service_curves import ServiceCurve


def _obs(now: float, *, ready: int = 1, starting: int = 0, queued: int = 0, active: int = 0,
         arrived: int = 0) -> Observation:
    return Observation(now=now, ready=ready, starting=starting, queued=queued, prefill_queued=0, active=active,
                       max_seqs=8, occupancy=(float(active),) * ready, arrived=arrived)


def _zero(cooldown_s: float = 300.0, threshold: float = 0.0) -> ScaleToZero:
    hpa = inflight_policy(HpaConfig(scale_down_stabilization_s=0.0), target=4.0)
    return ScaleToZero(hpa, activation_threshold=threshold, cooldown_s=cooldown_s)


def test_scale_to_zero_after_the_cooldown_with_no_activity_only():
    p = _zero(cooldown_s=300.0)
    assert p.decide(_obs(0.0, active=1)) == 1  # active: the HPA decides (1 in flight, target 4: stays 1)
    assert p.decide(_obs(150.0)) == 1  # inactive for 150 s < the cooldown: the HPA's min 1
    assert p.decide(_obs(285.0)) == 1
    assert p.decide(_obs(300.0)) == 0  # 300 s since the last active poll
    # arrivals since the last poll count as activity even when none is in flight at the poll
    p = _zero(cooldown_s=300.0)
    for t in range(0, 900, 15):
        assert p.decide(_obs(float(t), arrived=1 if t % 120 == 0 else 0)) == 1


def test_scale_from_zero_on_activation_then_the_hpa_takes_over():
    p = _zero(threshold=2.0)
    assert p.decide(_obs(0.0, ready=0, queued=2)) == 0  # 2 is not above the activation threshold
    assert p.decide(_obs(15.0, ready=0, queued=3)) == 1  # KEDA: 0 -> 1
    # starting pod, no ready one: the HPA has no metric and keeps the count
    assert p.decide(_obs(30.0, ready=0, starting=1, queued=40)) == 1
    # ready: the HPA scales on requests in flight per pod (40 / 4 -> 10 wanted, rate-limited to 5)
    assert p.decide(_obs(45.0, ready=1, active=8, queued=32)) == 5


def test_scale_to_zero_rejects_negative_settings():
    hpa = inflight_policy(HpaConfig(), target=4.0)
    with pytest.raises(ValueError):
        ScaleToZero(hpa, cooldown_s=-1.0)


def test_observation_counts_arrivals_since_the_last_sync():
    curve = ServiceCurve.exponential(100.0)
    sim = TierSim(curve, startup_s=0.0)
    sim.add_replicas(1, delay=0.0)
    for t in (0.0, 0.0, 0.0):
        sim.arrive([t, 0.0, 1.0])
    assert sim.observe(15.0).arrived == 3
    assert sim.observe(15.0).arrived == 0


def test_a_tier_scaled_to_zero_pays_the_start_up_on_its_first_request():
    """Arrivals with a 2-hour gap: the pool goes to 0 after the cooldown, is billed less than one
    static replica, and the first request after the gap waits for a whole pod start-up."""
    curve = ServiceCurve.exponential(100.0).with_overrides(startup_s=60.0)
    rng = np.random.default_rng(5)
    early = np.sort(rng.uniform(0.0, 600.0, 50))
    late = np.sort(rng.uniform(8000.0, 8600.0, 50))
    t = np.concatenate([early, late])
    completions = np.full(len(t), 10.0)  # 0.1 s each
    prompts = np.zeros(len(t))
    until = 9000.0
    policy = ScaleToZero(inflight_policy(HpaConfig(), target=4.0), cooldown_s=300.0)
    run = simulate_tier(curve, t, prompts, completions, policy, until=until)
    static = simulate_tier(curve, t, prompts, completions, StaticPolicy(1), until=until)
    assert np.isfinite(run.ttft).all()
    assert min(run.series_replicas) == 0
    assert run.replica_s < 0.5 * static.replica_s
    first_late = run.ttft[len(early)]  # TTFTs are recorded in order of first tokens; FIFO here
    assert first_late >= 60.0 - 15.0  # the start-up, less at most one poll of waiting before activation
    assert float(np.max(static.ttft)) < 5.0


def _config(**over) -> dict:
    tier = {"share": 0.5, "prompt_tokens": {"kind": "constant", "mean": 100},
            "completion_tokens": {"kind": "constant", "mean": 10}}
    data = {"base_rate_rps": 1.0, "day_hours": 0.25, "workers": 1,
            "tiers": {"small": {"profile": "llama-3.2-1b-h100x1-fp8", **tier},
                      "large": {"profile": "llama-3.3-70b-h100x2-fp8", **tier}}}
    data.update(over)
    return data


def test_per_tier_targets_override_the_policy_target():
    cfg = parse_config(_config(inflight={"target": 36, "per_tier": {"small": 180}},
                               queue={"target": 0.3}, cpu={"target": 0.7, "per_tier": {"large": 0.8}},
                               scale_to_zero={"tiers": ["small"], "cooldown_s": 600}))
    assert tier_target(cfg, "small", "inflight") == 180
    assert tier_target(cfg, "large", "inflight") == 36
    assert tier_target(cfg, "small", "queue") == 0.3
    assert tier_target(cfg, "large", "cpu") == 0.8
    small = autoscaler(cfg, "small", "inflight")
    assert isinstance(small, ScaleToZero) and small.cooldown_s == 600
    assert small.inner.hpa.target == 180
    large = autoscaler(cfg, "large", "queue")
    assert isinstance(large, HpaPolicy) and large.hpa.target == 0.3


@pytest.mark.parametrize(("change", "key"), [
    ({"inflight": {"per_tier": {"huge": 10}}}, "inflight.per_tier: huge"),
    ({"queue": {"per_tier": {"small": 0}}}, "queue.per_tier: targets must be > 0"),
    ({"scale_to_zero": {"tiers": ["medium"]}}, "scale_to_zero.tiers: medium"),
    ({"scale_to_zero": {"cooldown_s": -5}}, "scale_to_zero.cooldown_s"),
])
def test_per_tier_and_scale_to_zero_config_errors_name_the_key(change, key):
    with pytest.raises(ConfigError, match=key):
        parse_config(_config(**change), "sim.yaml")


# --- SLO points: the per-tier targets' derivation -------------------------------------------------


def test_slo_point_of_an_mm1_server_matches_the_closed_form():
    """One server, exponential service of mean 1 s, no prefill: the wait's tail is
    P(W > t) = ρ e^{-(1-ρ)t}, so p95 <= 2 s holds up to ρ ≈ 0.233; there the mean number in the
    system is ρ / (1 - ρ) ≈ 0.30 and the mean number waiting ρ² / (1 - ρ) ≈ 0.07."""
    from extproc.lab.simulate.slo_point import slo_point
    from extproc.lab.simulate.workload import TierMix, TokenDist

    rho = 0.2333
    assert rho * np.exp(-(1 - rho) * 2.0) == pytest.approx(0.05, abs=0.001)
    mix = TierMix(1.0, TokenDist("constant", 1.0), TokenDist("exponential", 10.0, integer=False))
    pt = slo_point(ServiceCurve.exponential(10.0), mix, 1, slo_s=2.0, hours=30.0, seed=3, iterations=8)
    assert pt.rate_rps == pytest.approx(rho, rel=0.12)
    assert pt.ttft_s <= 2.0
    r = pt.rate_rps
    assert pt.inflight_per_pod == pytest.approx(r / (1 - r), rel=0.25)
    assert pt.waiting_per_pod == pytest.approx(r * r / (1 - r), rel=0.5)


def test_slo_point_grows_with_the_pool_and_reports_zero_when_even_a_trickle_misses():
    from extproc.lab.simulate.slo_point import slo_point
    from extproc.lab.simulate.workload import TierMix, TokenDist

    mix = TierMix(1.0, TokenDist("constant", 1.0), TokenDist("exponential", 10.0, integer=False))
    curve = ServiceCurve.exponential(10.0)
    one = slo_point(curve, mix, 1, slo_s=2.0, hours=8.0, seed=4, iterations=6)
    three = slo_point(curve, mix, 3, slo_s=2.0, hours=8.0, seed=4, iterations=6)
    assert three.rate_rps / 3 > one.rate_rps  # pooling: more per server at the same SLO
    slow = TierMix(1.0, TokenDist("constant", 1.0), TokenDist("constant", 1.0, integer=False))
    prefill_bound = ServiceCurve.exponential(10.0).with_overrides(prefill_tokens_per_s=0.1)  # 10 s per prompt
    assert slo_point(prefill_bound, slow, 1, slo_s=2.0, hours=1.0, iterations=3).rate_rps == 0.0


def test_cli_prints_slo_points_and_names_a_bad_tier():
    import os
    import subprocess
    import sys

    from extproc.lab.simulate.run import EXAMPLE

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "extproc", "simulate", str(EXAMPLE), *args],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})

    r = cli("--slo-points", "1", "--slo-tiers", "large", "--slo-hours", "0.5")
    assert r.returncode == 0, r.stderr
    assert "SLO points" in r.stdout and "large" in r.stdout and "medium" not in r.stdout
    r = cli("--slo-points", "1", "--slo-tiers", "huge")
    assert r.returncode == 2 and "--slo-tiers: huge" in r.stderr
