"""The growth lab's capacity simulator (extproc/lab/simulate): the queueing model against closed-form
M/M/c results, the HPA's replica formula, stabilisation windows and scaling policies against
hand-computed cases, determinism, configuration errors, static sizing, and ``extproc simulate``
end to end on a short day."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("simpy")

from extproc.lab.simulate.autoscalers import (CpuModel, Hpa, HpaConfig, ScalingRule, StaticPolicy, replica_count,
                                              size_static)
from extproc.lab.simulate.config import ConfigError, load_config, parse_config
from extproc.lab.simulate.model import percentile, simulate_tier
from extproc.lab.simulate.output import write_json
from extproc.lab.simulate.run import EXAMPLE, simulate
from extproc.lab.simulate.service_curves import ServiceCurve, load_profiles
from extproc.lab.simulate.workload import constant_arrivals

# --- M/M/c ----------------------------------------------------------------------------------------


def erlang_c(c: int, a: float) -> float:
    """P(wait > 0) in an M/M/c queue with offered load ``a = λ/μ`` (< c)."""
    head = sum(a ** k / math.factorial(k) for k in range(c))
    tail = a ** c / math.factorial(c) * c / (c - a)
    return tail / (head + tail)


@pytest.mark.parametrize(("c", "lam"), [(1, 0.7), (3, 2.4), (8, 6.0)])
def test_mmc_mean_wait_matches_erlang_c(c, lam):
    """Poisson arrivals, exponential service (one sequence per replica, exponential completion tokens at
    a constant rate, no prefill), c static replicas: TTFT is the wait in the queue, whose mean is
    Erlang C / (cμ - λ). 150,000 arrivals (the first 5 % dropped as warm-up): within 10 %; the share
    that waits within 0.02 of C."""
    mu, tokens_per_s, n = 1.0, 10.0, 150_000
    rng = np.random.default_rng(2024 + c)
    horizon = n / lam
    t = constant_arrivals(lam, 0.0, horizon, rng)
    completions = rng.exponential(tokens_per_s / mu, len(t))  # service time = tokens / rate ~ Exp(mu)
    run = simulate_tier(ServiceCurve.exponential(tokens_per_s), t, np.zeros(len(t)), completions,
                        StaticPolicy(c), until=horizon, startup_s=0.0)
    assert len(run.ttft) == len(t) and np.isfinite(run.ttft).all()
    wait = run.ttft[len(t) // 20:]
    C = erlang_c(c, lam / mu)
    expected = C / (c * mu - lam)
    assert wait.mean() == pytest.approx(expected, rel=0.10)
    assert float(np.mean(wait > 1e-9)) == pytest.approx(C, abs=0.02)


def test_mmc_slot_seconds_are_the_offered_load():
    """Busy server-seconds over the run = λ/μ × the horizon (Little's law for the servers)."""
    rng = np.random.default_rng(5)
    lam, horizon = 2.0, 20_000.0
    t = constant_arrivals(lam, 0.0, horizon, rng)
    run = simulate_tier(ServiceCurve.exponential(10.0), t, np.zeros(len(t)), rng.exponential(10.0, len(t)),
                        StaticPolicy(4), until=horizon, startup_s=0.0)
    assert run.replica_s == pytest.approx(4 * horizon)
    assert run.slot_s / horizon == pytest.approx(lam / 1.0, rel=0.05)


# --- the HPA --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "unready", "current", "target", "want"), [
    ([90.0, 90.0], 0, 2, 60.0, 3),             # ratio 1.5: ceil(1.5 × 2)
    ([63.0, 63.0], 0, 2, 60.0, 2),             # ratio 1.05: within the 0.1 tolerance
    ([57.0, 57.0, 57.0], 0, 3, 60.0, 3),       # ratio 0.95: within
    ([20.0] * 4, 0, 4, 60.0, 2),               # ratio 1/3: ceil(4/3)
    ([0.0] * 5, 0, 5, 4.0, 0),                 # nothing queued: 0 (minReplicas applies later)
    ([120.0], 1, 2, 60.0, 2),                  # scale-up with an unready pod at 0: ratio 120/2/60 = 1.0
    ([180.0], 1, 2, 60.0, 3),                  # ... 180/2/60 = 1.5: ceil(1.5 × 2)
    ([100.0], 3, 4, 60.0, 4),                  # ... 100/4/60 < 1: direction reversed, no change
    ([30.0], 1, 2, 60.0, 1),                   # scale-down: unready pods are left out, ceil(0.5 × 1)
    ([], 2, 2, 60.0, 2),                       # no metrics: no change
])
def test_replica_formula(values, unready, current, target, want):
    assert replica_count(values, unready, current, target, tolerance=0.1) == want


def test_scale_down_stabilisation_window_keeps_the_highest_recommendation():
    hpa = Hpa(HpaConfig(scale_down_stabilization_s=300.0), target=1.0)
    assert hpa.step(0.0, 4, [1.0] * 4, 0) == 4
    for now in range(15, 300, 15):  # recommendation 1, but 4 was recommended within the last 300 s
        assert hpa.step(float(now), 4, [0.25] * 4, 0) == 4
    assert hpa.step(300.0, 4, [0.25] * 4, 0) == 1  # the t=0 recommendation left the window


def test_scale_up_stabilisation_window_keeps_the_lowest_recommendation():
    hpa = Hpa(HpaConfig(scale_up_stabilization_s=60.0), target=1.0)
    assert hpa.step(0.0, 2, [1.0, 1.0], 0) == 2
    assert hpa.step(15.0, 2, [3.0, 3.0], 0) == 2  # 6 wanted; 2 recommended 15 s ago
    assert hpa.step(45.0, 2, [3.0, 3.0], 0) == 2
    assert hpa.step(60.0, 2, [3.0, 3.0], 0) == 6  # only 6s left in the window (t > 0)


def test_default_scale_up_policy_is_max_of_100_percent_and_4_pods_per_15s():
    hpa = Hpa(HpaConfig(), target=1.0)
    assert hpa.step(0.0, 2, [10.0, 10.0], 0) == 6       # max(ceil(2 × 2), 2 + 4)
    assert hpa.step(10.0, 6, [10.0] * 6, 0) == 6        # +4 within the last 15 s: the period started at 2
    assert hpa.step(15.0, 6, [10.0] * 6, 0) == 12       # max(12, 10)
    assert hpa.step(30.0, 12, [10.0] * 12, 0) == 24     # max(24, 16)
    assert hpa.step(45.0, 24, [10.0] * 24, 0) == 48
    assert hpa.step(60.0, 48, [10.0] * 48, 0) == 96
    assert hpa.step(75.0, 96, [10.0] * 96, 0) == 100    # maxReplicas


def test_scale_up_select_min_and_disabled():
    rules = (ScalingRule("Percent", 100, 15), ScalingRule("Pods", 4, 15))
    assert Hpa(HpaConfig(scale_up_rules=rules, scale_up_select="Min"), 1.0).step(0.0, 2, [10.0, 10.0], 0) == 4
    assert Hpa(HpaConfig(scale_up_select="Disabled"), 1.0).step(0.0, 2, [10.0, 10.0], 0) == 2


def test_scale_down_percent_policy_per_period_and_min_replicas():
    cfg = HpaConfig(scale_down_stabilization_s=0.0, scale_down_rules=(ScalingRule("Percent", 10, 60),),
                    min_replicas=2)
    hpa = Hpa(cfg, target=1.0)
    assert hpa.step(0.0, 64, [0.0] * 64, 0) == 57       # int(64 × 0.9)
    assert hpa.step(15.0, 57, [0.0] * 57, 0) == 57      # the period started at 64: 57 already
    assert hpa.step(60.0, 57, [0.0] * 57, 0) == 51      # the t=0 event left the 60 s period
    hpa = Hpa(HpaConfig(scale_down_stabilization_s=0.0, min_replicas=2), target=1.0)
    assert hpa.step(0.0, 8, [0.0] * 8, 0) == 2          # default: 100 % per 15 s, then minReplicas


def test_scale_down_pods_policy():
    cfg = HpaConfig(scale_down_stabilization_s=0.0, scale_down_rules=(ScalingRule("Pods", 1, 120),))
    hpa = Hpa(cfg, target=1.0)
    assert hpa.step(0.0, 10, [0.0] * 10, 0) == 9
    assert hpa.step(60.0, 9, [0.0] * 9, 0) == 9
    assert hpa.step(120.0, 9, [0.0] * 9, 0) == 8


def test_hpa_config_rejects_bad_bounds():
    with pytest.raises(ValueError, match="min_replicas"):
        HpaConfig(min_replicas=5, max_replicas=2)
    with pytest.raises(ValueError, match="kind"):
        ScalingRule("Replicas", 1, 15)


def test_cpu_model_shape():
    """CPU says "busy or not" and barely how much: a pod busy all the period is above a 70 % target at
    any occupancy (so the HPA on CPU scales up as long as every pod has work)."""
    cpu = CpuModel()
    assert cpu.utilisation(0, 256, busy_share=0.0) == pytest.approx(0.10)
    assert cpu.utilisation(1, 256, busy_share=1.0) > 0.70 * 1.1
    assert cpu.utilisation(256, 256, busy_share=1.0) == pytest.approx(0.90)


# --- configuration --------------------------------------------------------------------------------


def _small_config(**over) -> dict:
    data = {
        "seed": 3, "day_hours": 0.5, "scales": [1, 2], "base_rate_rps": 1.0, "workers": 1,
        "policies": ["static", "cpu", "queue", "inflight"], "slo_ttft_s": 2.0,
        "tiers": {
            "small": {"profile": "llama-3.2-1b-h100x1-fp8", "share": 0.5,
                      "prompt_tokens": {"kind": "lognormal", "mean": 400, "cv": 0.5},
                      "completion_tokens": {"kind": "lognormal", "mean": 40, "cv": 0.5}},
            "large": {"profile": "llama-3.3-70b-h100x2-fp8", "share": 0.5,
                      "prompt_tokens": {"kind": "lognormal", "mean": 3000, "cv": 0.5},
                      "completion_tokens": {"kind": "lognormal", "mean": 200, "cv": 0.5}},
        },
        "hpa": {"max_replicas": 16},
    }
    data.update(over)
    return data


@pytest.mark.parametrize(("change", "key"), [
    ({"base_rate_rps": -1}, "base_rate_rps"),
    ({"hpa": {"sync_perod_s": 15}}, "hpa.sync_perod_s"),
    ({"scales": [1, 0]}, "scales"),
    ({"policies": ["static", "keda"]}, "policies.1"),
    ({"slo_quantile": 100}, "slo_quantile"),
    ({"hpa": {"min_replicas": 5, "max_replicas": 2}}, "hpa.min_replicas"),
])
def test_config_errors_name_the_key(change, key):
    with pytest.raises(ConfigError) as err:
        parse_config(_small_config(**change), "sim.yaml")
    assert f"sim.yaml: {key}" in str(err.value) or key in str(err.value)


def test_tier_errors_name_the_tier(tmp_path):
    data = _small_config()
    data["tiers"]["small"] = {"share": 1.0, "prompt_tokens": 10, "completion_tokens": 10}
    with pytest.raises(ConfigError, match=r"tiers\.small"):
        parse_config(data, "sim.yaml")
    data = _small_config()
    data["tiers"]["small"]["profile"] = "no-such-gpu"
    with pytest.raises(ConfigError, match=r"tiers\.small\.profile: 'no-such-gpu'"):
        simulate(parse_config(data, "sim.yaml"))
    data = _small_config()
    del data["tiers"]["large"]["share"]
    with pytest.raises(ConfigError, match=r"tiers\.large\.share"):
        simulate(parse_config(data, "sim.yaml"))
    f = tmp_path / "bad.yaml"
    f.write_text("base_rate_rps: 1\ntiers: {a: {profile: x}}\nstatic: {peak_window: 60}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: static.peak_window"):
        load_config(f)


def test_the_shipped_example_and_profiles_load():
    cfg = load_config(EXAMPLE)
    assert set(cfg.tiers) == {"small", "medium", "large"}
    profiles = load_profiles()
    for name, curve in profiles.items():
        assert curve.sources, name  # every number has a source
        assert curve.throughput(curve.max_seqs) > curve.throughput(1)


# --- static sizing, determinism, end to end -------------------------------------------------------


def test_static_sizing_meets_the_slo_at_the_peak_and_is_minimal():
    curve = load_profiles()["llama-3.3-70b-h100x2-fp8"]
    rng = np.random.default_rng(11)
    t = constant_arrivals(4.0, 0.0, 900.0, rng)
    prompts = np.ceil(rng.lognormal(math.log(3000), 0.5, len(t)))
    completions = np.ceil(rng.lognormal(math.log(200), 0.5, len(t)))
    s = size_static(curve, t, prompts, completions, slo_s=2.0, max_replicas=32)
    assert s.met and s.replicas >= 2 and s.p95_ttft_s <= 2.0
    tried = dict(s.tried)
    assert tried[s.replicas - 1] > 2.0  # one fewer misses the SLO
    run = simulate_tier(curve, t, prompts, completions, StaticPolicy(s.replicas), until=900.0, startup_s=0.0)
    assert percentile(run.ttft, 95) <= 2.0


@pytest.fixture(scope="module")
def small_result():
    return simulate(parse_config(_small_config(), "test"))


def test_simulate_produces_every_output_for_every_policy(small_result, tmp_path):
    res = small_result
    assert {(r.policy, r.scale) for r in res.results} == {(p, s) for p in ("static", "cpu", "queue", "inflight")
                                                         for s in (1.0, 2.0)}
    for r in res.results:
        assert r.requests > 0
        assert r.series_replicas and len(r.series_replicas) == len(r.series_t)  # replicas over the day
        assert min(r.series_replicas) >= 2  # at least one replica per tier
        assert r.gpu_hours > 0 and r.cost_usd > 0
        assert r.cost_per_request == pytest.approx(r.cost_usd / r.requests)
        assert math.isfinite(r.p95_ttft_s) and r.p50_ttft_s <= r.p95_ttft_s
        assert r.worst_tier_p95_ttft_s == max(t["p95_ttft_s"] for t in r.tiers.values())
        assert 0.0 <= r.slo_share <= 1.0 and 0.0 <= r.idle_share <= 1.0
        assert set(r.tiers) == {"small", "large"}
        for t in r.tiers.values():
            assert t["gpu_hours"] > 0 and t["series_replicas"]
    for s in (1.0, 2.0):
        st = res.get("static", s)
        for t in st.tiers.values():
            assert t["static_sizing"]["met"] and t["static_sizing"]["p95_ttft_s"] <= 2.0
        assert res.saving("static", s) == 0.0
    out = tmp_path / "sim.json"
    write_json(res, out)
    data = json.loads(out.read_text())
    assert len(data["results"]) == 8 and data["config"]["curves"]["large"]["gpus"] == 2


def test_simulate_is_deterministic_for_a_seed(small_result):
    cfg = _small_config(scales=[2], policies=["queue", "static"])
    a = simulate(parse_config(cfg, "test"))
    b = simulate(parse_config(cfg, "test"))
    for ra, rb in zip(a.results, b.results):
        assert (ra.policy, ra.gpu_hours, ra.p95_ttft_s, ra.series_replicas) == \
               (rb.policy, rb.gpu_hours, rb.p95_ttft_s, rb.series_replicas)
    # the same arrivals as the 4-policy run at that scale (common random numbers)
    assert a.get("queue", 2.0).gpu_hours == small_result.get("queue", 2.0).gpu_hours
    c = simulate(parse_config({**cfg, "seed": 4}, "test"))
    assert c.get("static", 2.0).requests != a.get("static", 2.0).requests


# --- the command ----------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # the table's policy column unabridged
    return subprocess.run([sys.executable, "-m", "extproc", "simulate", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_help():
    r = _cli("--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--out", "--scales", "--mix", "--workers", "config"):
        assert opt in r.stdout


def test_cli_runs_the_example_on_a_short_day(tmp_path):
    out = tmp_path / "sim.json"
    r = _cli(str(EXAMPLE), "--day-hours", "0.25", "--scales", "1,2", "--workers", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "Capacity simulation" in r.stdout and "queue" in r.stdout
    data = json.loads(out.read_text())
    assert {(x["policy"], x["scale"]) for x in data["results"]} == \
           {(p, s) for p in ("static", "cpu", "queue", "inflight") for s in (1.0, 2.0)}


def test_cli_reports_a_bad_option(tmp_path):
    r = _cli(str(EXAMPLE), "--scales", "one")
    assert r.returncode == 2 and "--scales 'one'" in r.stderr
    r = _cli(str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml" in r.stderr
