"""Metrics, usage records and `extproc report` through real Envoy, real Triton and 2 worker processes.

One batch of traffic (plain, streamed, legacy completions, a client retry, bad input, a fail-open
plugin failure) for two configured tenants/workflows and one that is not (labelled ``other``);
then: every counter on the parent's ``/metrics`` moved by exactly what the clients were told
(tokens = the ``usage`` they got, cost = tokens × the tier's price), the usage records in the Redis
stream add up to the same totals, and ``extproc report`` renders its tables and PNGs from them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc.observability.usage import read_redis

from ..conftest import ROOT, free_port, require

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).with_name("observability-e2e.yaml")
PRICES = {"small": (0.0001, 0.0002), "medium": (0.0005, 0.0015), "large": (0.003, 0.006)}
KNOWN_TENANTS, KNOWN_WORKFLOWS = {"acme", "globex"}, {"support", "search"}


@pytest.fixture(scope="module")
def obs(make_stack, redis_url, tmp_path_factory):
    import importlib.util

    require(importlib.util.find_spec("extproc_test_plugins") is not None,
            "extproc_test_plugins is not installed (make test installs it)")
    work = tmp_path_factory.mktemp("observability")
    config = yaml.safe_load(CONFIG.read_text())
    stream = f"usage-e2e-{uuid.uuid4().hex[:8]}"
    for entry in config["plugins"]:
        if entry["name"] == "usage_records":
            entry["settings"].update(path=str(work / "usage.jsonl"), stream=stream)
    path = work / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    stack = make_stack(path, workers=2, redis=True, metrics_port=free_port())
    return {"stack": stack, "work": work, "stream_key": f"extproc:{stream}", "redis_url": redis_url}


def _label(value, known):
    return value if value in known else "other"


@pytest.fixture(scope="module")
def traffic(obs):
    """Send the batch; return what the clients were told, summed per (tenant, workflow, tier)."""
    import httpx
    import openai

    stack = obs["stack"]
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)
    tokens = defaultdict(lambda: {"prompt": 0, "completion": 0})
    retry_tokens = defaultdict(lambda: {"prompt": 0, "completion": 0})
    outcomes = defaultdict(int)

    def tags(tenant, workflow):
        return {"x-test-tenant": tenant, "x-test-workflow": workflow}

    def count(tenant, workflow, tier, usage, into=tokens):
        key = (_label(tenant, KNOWN_TENANTS), _label(workflow, KNOWN_WORKFLOWS), tier)
        into[key]["prompt"] += usage.prompt_tokens
        into[key]["completion"] += usage.completion_tokens
        outcomes[("completed", tier)] += 1

    plan = [("acme", "support", "small"), ("globex", "search", "medium"), ("acme", "search", "small"),
            ("globex", "support", "medium"), ("acme", "support", "large"), ("initech", "batch", "small")]
    for i, (tenant, workflow, tier) in enumerate(plan):
        r = client.chat.completions.create(model=tier, max_tokens=3 + i % 3, extra_headers=tags(tenant, workflow),
                                           messages=[{"role": "user", "content": f"request {i} about costs"}])
        assert r.usage.completion_tokens > 0
        count(tenant, workflow, tier, r.usage)
    for i in range(2):  # streamed, usage in the final chunk
        usage = None
        for chunk in client.chat.completions.create(
                model="small", max_tokens=4, stream=True, stream_options={"include_usage": True},
                extra_headers=tags("acme", "support"), messages=[{"role": "user", "content": f"stream {i}"}]):
            usage = chunk.usage or usage
        count("acme", "support", "small", usage)
    r = client.completions.create(model="medium", prompt="legacy completion", max_tokens=3,
                                  extra_headers=tags("globex", "search"))
    count("globex", "search", "medium", r.usage)
    r = client.chat.completions.create(model="small", max_tokens=3, extra_headers=tags("acme", "support"),
                                       messages=[{"role": "user", "content": "please raise-open now"}])
    count("acme", "support", "small", r.usage)

    with httpx.Client(base_url=f"http://127.0.0.1:{stack.ports.listen}", timeout=60) as http:
        retry = http.post("/v1/chat/completions", headers={**tags("globex", "support"), "x-retry-attempt": "1"},
                          json={"model": "small", "max_tokens": 3, "messages": [{"role": "user", "content": "again"}]})
        assert retry.status_code == 200
        u = retry.json()["usage"]
        key = ("globex", "support", "small")
        retry_tokens[key]["prompt"] += u["prompt_tokens"]
        retry_tokens[key]["completion"] += u["completion_tokens"]
        tokens[key]["prompt"] += u["prompt_tokens"]
        tokens[key]["completion"] += u["completion_tokens"]
        outcomes[("completed", "small")] += 1
        bad = http.post("/v1/chat/completions", headers=tags("acme", "support"), json={"model": "small"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        outcomes[("replied", "none")] += 1
    total = sum(outcomes.values())
    return {"tokens": dict(tokens), "retry_tokens": dict(retry_tokens), "outcomes": dict(outcomes), "total": total}


def scrape(stack) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return samples


def total(samples, name, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.fixture(scope="module")
def metrics(obs, traffic):
    """/metrics once every request of the batch is recorded (request_finished runs as streams close)."""
    deadline = time.monotonic() + 20
    while True:
        samples = scrape(obs["stack"])
        if total(samples, "extproc_requests_total") >= traffic["total"] or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_every_counter_moved_by_what_the_traffic_implies(traffic, metrics):
    assert total(metrics, "extproc_requests_total") == traffic["total"]
    for (outcome, tier), n in traffic["outcomes"].items():
        assert total(metrics, "extproc_requests_total", outcome=outcome, tier=tier) == n, (outcome, tier)
    for (tenant, workflow, tier), t in traffic["tokens"].items():
        who = {"tenant": tenant, "workflow": workflow, "tier": tier}
        assert total(metrics, "extproc_tokens_total", kind="prompt", **who) == t["prompt"], who
        assert total(metrics, "extproc_tokens_total", kind="completion", **who) == t["completion"], who
        p, c = PRICES[tier]
        r = traffic["retry_tokens"].get((tenant, workflow, tier), {"prompt": 0, "completion": 0})
        first = ((t["prompt"] - r["prompt"]) * p + (t["completion"] - r["completion"]) * c) / 1000
        retried = (r["prompt"] * p + r["completion"] * c) / 1000
        billed = (total(metrics, "extproc_cost_usd_total", kind="prompt", **who)
                  + total(metrics, "extproc_cost_usd_total", kind="completion", **who))
        assert billed == pytest.approx(first, rel=1e-9, abs=1e-15), who
        assert total(metrics, "extproc_cost_usd_total", kind="retries", **who) == pytest.approx(retried, rel=1e-9, abs=1e-15)
    # Everything counted, and nothing else: label sets outside the traffic are empty.
    all_tokens = sum(t["prompt"] + t["completion"] for t in traffic["tokens"].values())
    assert total(metrics, "extproc_tokens_total") == all_tokens
    assert total(metrics, "extproc_tokens_total", tenant="other", workflow="other") > 0  # initech/batch bounded
    assert total(metrics, "extproc_retries_total", tenant="globex", workflow="support", tier="small") == 1
    assert total(metrics, "extproc_cost_usd_total", kind="overhead") > 0  # gateway_cpu_hour_usd is set
    assert total(metrics, "extproc_plugin_failures_total", plugin="test_raiser_open", hook="extproc_request_parsed") == 1
    assert total(metrics, "extproc_degraded_requests_total", plugin="test_raiser_open") == 1
    assert total(metrics, "extproc_responses_total", code="400") == 1
    completed = sum(n for (o, _), n in traffic["outcomes"].items() if o == "completed")
    assert total(metrics, "extproc_routing_decisions_total", reason="pinned") == completed
    # Latency: every phase and plugin timed per request, time to first token and upstream time per answer.
    assert total(metrics, "extproc_phase_duration_seconds_count", phase="request_headers") == traffic["total"]
    assert total(metrics, "extproc_phase_duration_seconds_count", phase="response_body") == completed
    assert total(metrics, "extproc_plugin_duration_seconds_count", plugin="model_tiers") == completed
    assert total(metrics, "extproc_time_to_first_token_seconds_count") == completed
    assert total(metrics, "extproc_time_to_first_token_seconds_count", stream="true") == 2
    assert total(metrics, "extproc_upstream_duration_seconds_count") == completed
    assert total(metrics, "extproc_request_duration_seconds_count") == traffic["total"]


def test_triton_queue_depth_and_compute_time_per_tier(obs, metrics):
    assert total(metrics, "extproc_triton_up") == 1
    for tier in ("small", "medium", "large"):
        assert ("extproc_triton_queue_depth", (("model", f"llm-{tier}"), ("tier", tier))) in metrics
        assert total(metrics, "extproc_triton_inferences_total", tier=tier) >= 1
    # No GPU on the CPU reference stack: Triton reports no GPU memory, and so neither do we.
    assert total(metrics, "extproc_triton_gpu_memory_total_bytes") == 0


def test_two_workers_record_into_one_view(obs, metrics):
    # Each worker writes its own metrics file; /metrics above merged them. How Envoy's connections
    # were spread is the kernel's choice (SO_REUSEPORT), so only the merge is asserted here;
    # tests/unit/test_metrics_serve.py forces traffic onto both workers of a real `extproc serve`.
    log = (obs["stack"].work_dir / "logs" / "extproc.log").read_text()
    assert log.count("serving ext_proc") == 2


@pytest.fixture(scope="module")
def records(obs, traffic, metrics):
    deadline = time.monotonic() + 10
    while True:  # records are written in batches every flush_seconds
        found = read_redis(obs["redis_url"], obs["stream_key"])
        if len(found) >= traffic["total"] or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_usage_records_add_up_to_the_same_totals(traffic, metrics, records):
    assert len(records) == traffic["total"]
    assert len({r["request_id"] for r in records}) == traffic["total"]
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in records) == total(metrics, "extproc_tokens_total")
    for kind in ("prompt", "completion", "retries", "overhead"):
        assert sum(r["cost"][kind] for r in records) == pytest.approx(
            total(metrics, "extproc_cost_usd_total", kind=kind), rel=1e-9, abs=1e-15), kind
    assert sum(r["cost_usd"] for r in records) == pytest.approx(total(metrics, "extproc_cost_usd_total"), rel=1e-9)
    by_tenant = defaultdict(int)
    for r in records:
        by_tenant[r["tenant"]] += r["prompt_tokens"] + r["completion_tokens"]
    assert by_tenant["initech"] == total(metrics, "extproc_tokens_total", tenant="other")
    retried = [r for r in records if r["retry"]]
    assert len(retried) == 1 and retried[0]["cost"]["prompt"] == 0 and retried[0]["cost"]["retries"] > 0
    completed = [r for r in records if r["outcome"] == "completed"]
    assert all(r["latency_ms"]["ttft"] is not None and r["latency_ms"]["upstream"] > 0 for r in completed)
    bad = [r for r in records if r["outcome"] == "replied"]
    assert len(bad) == 1 and bad[0]["status"] == 400 and bad[0]["cost_usd"] >= 0


def test_report_renders_tables_and_pngs_from_the_records(obs, traffic, records, tmp_path):
    base = [sys.executable, "-m", "extproc", "report", "--redis", obs["redis_url"], "--stream", obs["stream_key"]]
    out = subprocess.run([*base, "--format", "json", "--charts", str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["total"]["requests"] == traffic["total"]
    assert summary["total"]["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in records), rel=1e-9)
    tiers = {row["tier"]: row for row in summary["by_tier"]}
    assert tiers["small"]["requests"] == traffic["outcomes"][("completed", "small")]
    assert sum(row["share"] for row in summary["by_tier"]) == pytest.approx(1.0)
    assert {row["tenant"] for row in summary["by_tenant"]} == {"acme", "globex", "initech"}
    for name in ("cost_over_time.png", "tier_mix.png", "cache_hit_rate.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    table = subprocess.run([*base, "--since", "1h"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert table.returncode == 0, table.stderr
    for heading in ("by workflow:", "by tenant:", "by tier:", "$/1K tok", "cache hit"):
        assert heading in table.stdout
    assert f"usage report: {traffic['total']} request(s)" in table.stdout
