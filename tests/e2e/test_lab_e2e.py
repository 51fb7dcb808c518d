"""The growth lab's load runner against real stacks (Envoy, the service, Triton, Redis), short.

Two gateways in front of one Triton: the naive baseline (extproc/lab/configs/naive.yaml) and the
gateway mode (the embedded default configuration), both as ``extproc loadtest`` writes them. The
same hand-built plan of 14 requests over 4 s (chat and legacy completions, streamed and not,
three identical temperature-0 requests for the exact cache) goes to each. Then: the runner's
request and token counts agree with each gateway's own ``/metrics`` counters, every request
reached the large tier in naive mode, the gateway answered repeats from its cache, Triton's
counters moved by the upstream calls, and the report is produced from the results directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid

import pytest
import yaml

from extproc.commands.loadtest import mode_config, prices_of
from extproc.lab.report.build import build
from extproc.lab.report.charts import CHARTS
from extproc.lab.runner import scrape
from extproc.lab.runner.records import HIT_STATUSES
from extproc.lab.runner.run import Target, run_scale
from extproc.lab.workload.plan import PlannedRequest, RetryPolicy

from .conftest import free_port

pytestmark = pytest.mark.e2e

RUN = uuid.uuid4().hex[:8]  # prompts of this run only: nothing cached by another test can answer them


def plan() -> list[PlannedRequest]:
    out = []
    for i in range(14):
        repeat = i in (3, 7, 11)  # the same deterministic request three times
        legacy = i % 5 == 4
        content = f"lab e2e {RUN}: the same question" if repeat else f"lab e2e {RUN}: question {i}"
        body = {"model": "auto", "max_tokens": 6, "temperature": 0 if repeat else 0.8}
        if legacy:
            body["prompt"] = content
        else:
            body["messages"] = [{"role": "user", "content": content}]
        out.append(PlannedRequest(
            at=0.3 * i, index=i, tenant="lab", workflow="e2e", service="svc", session=f"s{i}", turn=0,
            endpoint="/v1/completions" if legacy else "/v1/chat/completions", body=body,
            stream=i % 2 == 1 and not repeat, difficulty="large" if i % 3 == 0 else "small",
            kind="repeat" if repeat else "fresh", retry=RetryPolicy(timeout_s=30, retries=1, backoff_s=0.2)))
    return out


@pytest.fixture(scope="module")
def lab(make_stack, tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    args = argparse.Namespace(naive_config=None, gateway_config=None)
    stacks = {}
    for mode in ("naive", "gateway"):
        path = mode_config(mode, args, "e2e", out / mode)
        config = yaml.safe_load(path.read_text())
        config["state"] = {**(config.get("state") or {}), "key_prefix": f"lab{RUN}{mode}:"}
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        first = next(iter(stacks.values()), None)
        stacks[mode] = make_stack(path, workers=2, metrics_port=free_port(), share_triton_with=first)
    summaries = {}
    for mode, stack in stacks.items():
        p = stack.ports
        target = Target(stack.base_url, f"http://127.0.0.1:{stack.metrics_port}/metrics",
                        f"http://127.0.0.1:{p.triton_metrics}/metrics", f"http://127.0.0.1:{p.admin}/stats/prometheus")
        meta = {"mode": mode, "scale": 1.0, "seed": 0, "workload": "e2e",
                "prices": prices_of(out / mode / "config.yaml", 2.5)}
        summaries[mode] = asyncio.run(run_scale(plan(), target, out / mode / "scale-1", duration=10, drain_s=20,
                                                meta=meta))
    return out, summaries


def lines(out, mode):
    return [json.loads(x) for x in (out / mode / "scale-1" / "requests.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["naive", "gateway"])
def test_runner_counts_agree_with_the_gateways_metrics(lab, mode):
    out, summaries = lab
    summary, results = summaries[mode], lines(out, mode)
    assert summary["outcomes"] == {"ok": 14, "error": 0, "unfinished": 0}, summary["outcomes"]
    gateway = summary["metrics"]["gateway"]["delta"]
    assert gateway is not None, summary["metrics"]["gateway"]["error"]
    attempts = [a for r in results for a in r["attempts"]]
    assert scrape.total(gateway, "extproc_requests_total") == len(attempts)
    # the gateway counts the usage of what went upstream; a cached answer is counted as saved
    upstream = [a for a in attempts if a["headers"].get("x-extproc-cache") not in HIT_STATUSES]
    for kind, field in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
        assert scrape.total(gateway, "extproc_tokens_total", kind=kind) == sum(a[field] for a in upstream), kind
    assert all(a["completion_tokens"] > 0 for a in attempts)
    streamed = [r for r in results if r["stream"]]
    assert streamed and all(0 < r["ttft_s"] <= r["latency_s"] for r in streamed)
    # Triton: one inference per upstream call (Envoy's health checks taken out by the report)
    triton = summary["metrics"]["triton"]["delta"]
    assert triton is not None, summary["metrics"]["triton"]["error"]
    if mode == "naive":
        assert {r["tier"] for r in results} == {"large"}
        assert scrape.total(triton, "nv_inference_count_total", model="llm-large") >= len(upstream)
    else:
        assert sum(1 for r in results if r["cache"] == "hit") == 2, [r["cache"] for r in results]


def test_report_of_the_two_runs(lab):
    out, _summaries = lab
    report = build(out)
    runs = {r["mode"]: r for r in report.runs}
    assert set(runs) == {"naive", "gateway"}
    naive, gateway = runs["naive"], runs["gateway"]
    assert naive["tier_mix"] == {"large": 1.0} and naive["large_share_on_large"] == 1.0
    assert gateway["cache_hit_rate"] == pytest.approx(2 / 14)
    # what the client was answered, priced at the tiers, is what the gateway booked for it
    for r in (naive, gateway):
        booked = r["booked_by_gateway_usd"]
        assert r["cost_usd"]["prompt"] + r["cost_usd"]["completion"] + r["cost_usd"]["retries"] == pytest.approx(
            booked["prompt"] + booked["completion"] + booked["retries"], rel=1e-6)
        assert r["gpu"]["llm-large"]["inferences"] >= 1 and r["gpu_seconds_per_request"] > 0
    assert gateway["cost_per_request_usd"] < naive["cost_per_request_usd"]
    assert sorted(p.name for p in report.charts) == sorted(CHARTS)
    assert report.html_path.exists() and json.loads(report.json_path.read_text())["comparison"]["by_scale"]
