"""Model-tier routing through real Envoy, real Triton (CPU tiers) and the real service (2 workers).

Proof that a request landed on a tier is Triton's own inference count for that model
(``/v2/models/<model>/stats``) moving by one -- and no other tier's -- plus the ``model`` of the
answer and the ``x-extproc-tier`` / ``x-extproc-tier-reason`` headers Envoy passes back.

The deep queue is the one test-controlled input: the reference tiers are *decoupled* Triton models
(``execute()`` hands requests to the engine at once), so Triton's ``pending`` gauge is 0 however
loaded they are; ``load_spill`` reads a metrics endpoint served by this module instead, in Triton's
format. Everything else is real: the scrape, the parse, the spill, the route through Envoy.

Fail-over is Envoy's: a second gateway on the same Triton whose Envoy has ``tier_large`` on a dead
port; ``large`` requests go through the aggregate cluster ``tier_large_failover`` to ``tier_medium``.
"""

from __future__ import annotations

import http.server
import json
import time
import threading
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from extproc.commands.cli import main as extproc_main
from extproc.commands.stack import ManagedProcess, Stack, StackPorts, http_ok

from ..conftest import free_port, require

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).with_name("routing-e2e.yaml")

# Prompts written for this test (none is in the labelled set or the example utterances).
SMALL = "What is the chemical symbol for silver?"
MEDIUM = "Write a short, friendly email telling our volunteers that Saturday's cleanup starts at nine."
LARGE = "Implement a persistent red-black tree in Haskell and prove that insertion keeps it balanced."
MODELS = {"small": "llm-small", "medium": "llm-medium", "large": "llm-large"}


class FakeTritonMetrics:
    """A /metrics endpoint in Triton's format whose per-model pending counts the tests set."""

    def __init__(self):
        self.pending: dict[str, int] = {}
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                lines = ["# TYPE nv_inference_pending_request_count gauge"]
                for model in MODELS.values():
                    lines.append(f'nv_inference_pending_request_count{{model="{model}",version="1"}} '
                                 f'{owner.pending.get(model, 0)}')
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def routing(make_stack, tmp_path_factory):
    import importlib.util

    require(importlib.util.find_spec("extproc_test_plugins") is not None,
            "extproc_test_plugins is not installed (make test installs it)")
    metrics = FakeTritonMetrics()
    config = yaml.safe_load(CONFIG.read_text())
    for entry in config["plugins"]:
        if entry["name"] == "load_spill":
            entry["settings"]["metrics_url"] = metrics.url
    path = tmp_path_factory.mktemp("routing") / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    stack = make_stack(path, workers=2, redis=True, metrics_port=free_port())
    yield {"stack": stack, "config": path, "metrics": metrics}
    metrics.close()


@pytest.fixture
def client(routing):
    return openai.OpenAI(base_url=routing["stack"].base_url, api_key="unused", max_retries=0, timeout=60)


def triton_counts(stack) -> dict[str, int]:
    out = {}
    for model in MODELS.values():
        url = f"http://127.0.0.1:{stack.ports.triton_http}/v2/models/{model}/stats"
        with urllib.request.urlopen(url, timeout=5) as r:
            stats = json.loads(r.read())["model_stats"]
        out[model] = sum(s["inference_stats"]["success"]["count"] for s in stats)
    return out


def settled_counts(stack, before: dict[str, int], *, expect_moved: bool) -> dict[str, int]:
    """Triton counts once they stop moving: a decoupled model counts a success at its final
    flag, which can land a moment after the client has its answer."""
    after = triton_counts(stack)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        time.sleep(0.05)
        again = triton_counts(stack)
        if again == after and (not expect_moved or again != before):
            break
        after = again
    return after


def ask(client, prompt, *, model="auto", headers=None, **extra):
    """One chat completion; returns (status, response headers, body dict)."""
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model, max_tokens=4, temperature=0, messages=[{"role": "user", "content": prompt}],
            extra_headers=headers or {}, **extra)
    except openai.APIStatusError as err:
        return err.status_code, err.response.headers, err.response.json()
    return raw.status_code, raw.headers, raw.parse().model_dump()


def landed(routing, client, prompt, **kwargs):
    """Send and return (status, tier header, reason header, body, {model: Triton count delta})."""
    before = triton_counts(routing["stack"])
    status, headers, body = ask(client, prompt, **kwargs)
    after = settled_counts(routing["stack"], before, expect_moved=status == 200)
    moved = {m: after[m] - before[m] for m in after if after[m] != before[m]}
    return status, headers.get("x-extproc-tier"), headers.get("x-extproc-tier-reason"), body, moved


def test_auto_requests_land_on_the_intended_tier(routing, client):
    for prompt, tier in ((SMALL, "small"), (MEDIUM, "medium"), (LARGE, "large")):
        status, got, reason, body, moved = landed(routing, client, prompt)
        assert status == 200, body
        assert (got, body["model"], moved) == (tier, MODELS[tier], {MODELS[tier]: 1}), (prompt, reason)
        assert reason in ("semantic_routes", "learned_router")


def test_pinned_requests_stay_pinned(routing, client):
    status, tier, reason, body, moved = landed(routing, client, LARGE, model="small")
    assert (status, tier, reason, body["model"], moved) == (200, "small", "pinned", "llm-small", {"llm-small": 1})
    status, tier, reason, body, moved = landed(routing, client, SMALL, model="llm-large")
    assert (status, tier, reason, moved) == (200, "large", "pinned", {"llm-large": 1})


def test_forbidden_tier_is_refused_403_or_narrowed(routing, client):
    free = {"x-test-tenant": "free"}
    status, tier, _, body, moved = landed(routing, client, SMALL, model="large", headers=free)
    assert status == 403 and moved == {}
    assert body["error"]["code"] == "model_not_allowed" and body["error"]["param"] == "model"
    # auto: large is no candidate for this tenant, the router's choice becomes the nearest allowed
    status, tier, reason, body, moved = landed(routing, client, LARGE, headers=free)
    assert (status, tier, moved) == (200, "medium", {"llm-medium": 1}), reason
    # pinned: reroute configured for this tenant
    status, tier, reason, body, moved = landed(routing, client, SMALL, model="large", headers={"x-test-tenant": "trial"})
    assert (status, tier, reason, moved) == (200, "medium", "route_rules:trial_plan", {"llm-medium": 1})
    # a workflow rule decides before the routers
    status, tier, reason, body, moved = landed(routing, client, LARGE, headers={"x-test-workflow": "nightly"})
    assert (status, tier, reason, moved) == (200, "small", "route_rules:nightly_batch", {"llm-small": 1})


def test_required_capabilities_pick_a_capable_tier_or_get_400(routing, client):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    status, headers, body = ask(client, SMALL, tools=tools)
    assert status == 200 and headers["x-extproc-tier"] == "passthrough"  # the only tier with tools
    status, headers, body = ask(client, SMALL, response_format={"type": "json_object"})
    assert status == 200 and headers["x-extproc-tier"] == "passthrough"
    status, headers, body = ask(client, SMALL, tools=tools, headers={"x-test-tenant": "free"})
    assert status == 200  # deny large does not touch passthrough
    status, headers, body = ask(client, "word " * 9000)  # no tier's context window holds it
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def test_deep_queue_spills_to_another_tier(routing, client):
    metrics = routing["metrics"]
    metrics.pending["llm-large"] = 12
    try:
        import time

        time.sleep(0.3)  # past the spill policy's max_age
        status, tier, reason, body, moved = landed(routing, client, LARGE)
        assert (status, tier, reason, body["model"], moved) == (200, "medium", "load_spill", "llm-medium",
                                                                {"llm-medium": 1})
        metrics.pending["llm-medium"] = 20  # medium is busy too: small takes it (no bound)
        time.sleep(0.3)
        status, tier, reason, body, moved = landed(routing, client, LARGE)
        assert (tier, moved) == ("small", {"llm-small": 1})
        status, tier, reason, body, moved = landed(routing, client, SMALL, model="large")
        assert (tier, reason) == ("large", "pinned")  # pinned is not spilled
    finally:
        metrics.pending.clear()
    time.sleep(0.3)
    status, tier, reason, body, moved = landed(routing, client, LARGE)
    assert (tier, moved) == ("large", {"llm-large": 1})


def test_over_soft_budget_is_downgraded_one_tier(routing, client):
    over = {"x-test-over-soft-budget": "1"}
    status, tier, reason, body, moved = landed(routing, client, LARGE, headers=over)
    assert (status, tier, reason, body["model"], moved) == (200, "medium", "budget_downgrade", "llm-medium",
                                                            {"llm-medium": 1})
    status, tier, reason, body, moved = landed(routing, client, MEDIUM, headers=over)
    assert (tier, reason, moved) == ("small", "budget_downgrade", {"llm-small": 1})


def test_explain_matches_what_the_gateway_did(routing, client, capsys):
    cases = [(SMALL, "auto", {}), (MEDIUM, "auto", {}), (LARGE, "auto", {}), (LARGE, "auto", {"x-test-tenant": "free"}),
             (LARGE, "auto", {"x-test-over-soft-budget": "1"}), (SMALL, "large", {"x-test-tenant": "trial"}),
             (SMALL, "large", {"x-test-tenant": "free"}), (LARGE, "llm-small", {})]
    for prompt, model, headers in cases:
        status, got_headers, body = ask(client, prompt, model=model, headers=headers)
        argv = ["route", "--explain", prompt, "--model", model, "--json", "--config", str(routing["config"])]
        for k, v in headers.items():
            argv += ["--header", f"{k}:{v}"]
        assert extproc_main(argv) == 0
        explained = json.loads(capsys.readouterr().out)
        if status == 200:
            assert explained["status"] is None
            assert (explained["tier"], explained["reason"]) == (got_headers["x-extproc-tier"],
                                                                got_headers["x-extproc-tier-reason"]), prompt
        else:
            assert explained["status"] == status and explained["error"] == body


def test_routing_decisions_are_counted_by_tier_and_reason(routing, client):
    from prometheus_client.parser import text_string_to_metric_families

    ask(client, LARGE, headers={"x-test-over-soft-budget": "1"})
    with urllib.request.urlopen(f"http://127.0.0.1:{routing['stack'].metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    counts = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "extproc_routing_decisions_total":
                counts[(s.labels["tier"], s.labels["reason"])] = s.value
            if s.name == "extproc_route_steps_total":
                counts[("step", s.labels["plugin"])] = s.value
    assert counts.get(("medium", "budget_downgrade"), 0) >= 1
    assert counts.get(("large", "pinned"), 0) >= 1
    assert counts.get(("medium", "load_spill"), 0) >= 1
    assert counts.get(("step", "learned_router"), 0) + counts.get(("step", "semantic_routes"), 0) >= 3


# ---------------------------------------------------------------------------- Envoy fail-over


class DeadLargeStack(Stack):
    """A gateway (service + Envoy) whose Envoy has tier_large's only host on a closed port."""

    dead_port: int = 0

    def start_envoy(self) -> None:
        from extproc.commands.envoy_config import dump_config, envoy_binary, load_config, render_config_dict

        config = render_config_dict(
            load_config(self.envoy_yaml), listen_port=self.ports.listen, admin_port=self.ports.admin,
            extproc_port=self.ports.extproc, triton_port=self.ports.triton_http,
            passthrough_port=self.ports.passthrough, listen_address="127.0.0.1")
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "tier_large":
                for ep in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]:
                    ep["endpoint"]["address"]["socket_address"]["port_value"] = self.dead_port
        path = self.work_dir / "envoy.yaml"
        path.write_text(dump_config(config))
        self.envoy = ManagedProcess("envoy", [envoy_binary(), "-c", str(path), "--use-dynamic-base-id",
                                              "--log-level", "warn", "--concurrency", "2"],
                                    self.work_dir / "logs" / "envoy.log")
        self.envoy.start()
        self.envoy.wait_until(lambda: http_ok(f"http://127.0.0.1:{self.ports.admin}/ready"), 30, "ready")

    def clusters_healthy(self, clusters) -> bool:
        # small and medium healthy, large seen unhealthy by Envoy's health check
        return super().clusters_healthy(("tier_small", "tier_medium")) and not super().clusters_healthy(("tier_large",))


def envoy_stat(stack, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.admin}/stats?filter=^{name}$", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def test_a_down_tier_fails_over_through_envoy(routing, tmp_path_factory, stub_upstream):
    main = routing["stack"]
    work = tmp_path_factory.mktemp("failover")
    ports = StackPorts(0, 0, 0, main.ports.triton_http, main.ports.triton_grpc, main.ports.triton_metrics,
                       stub_upstream)
    gw = DeadLargeStack(work, ports=ports, config_path=routing["config"], workers=1, with_triton=False)
    gw.dead_port = free_port()
    gw.start()
    try:
        client = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=60)
        medium_before = envoy_stat(gw, "cluster.tier_medium.upstream_rq_total")
        before = triton_counts(main)
        status, headers, body = ask(client, SMALL, model="large")
        after = triton_counts(main)
        assert status == 200 and headers["x-extproc-tier"] == "large"  # the gateway chose large...
        # ...Envoy sent it to tier_medium's host (tier_large has none healthy), and large never answered
        assert envoy_stat(gw, "cluster.tier_medium.upstream_rq_total") == medium_before + 1
        assert envoy_stat(gw, "cluster.tier_large.upstream_rq_total") == 0
        assert envoy_stat(gw, "cluster.tier_large_failover.upstream_rq_200") >= 1
        # The request is replayed as prepared for large (path /v2/models/llm-large/...): here the
        # medium pool is the same Triton, so llm-large answers. See envoy/README.md, fail-over.
        assert {m: after[m] - before[m] for m in after if after[m] != before[m]} == {"llm-large": 1}
    finally:
        gw.stop()
