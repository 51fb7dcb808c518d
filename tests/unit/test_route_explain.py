"""extproc route --explain: the gateway's own plugin chain, up to the upstream call, nothing sent."""

from __future__ import annotations

import json

import pytest
import yaml

from extproc.commands.cli import main
from extproc.framework.config import default_config_text, load_config, parse_config
from extproc.commands.route_explain import build_body, deciding_plugins, explain
from extproc.framework.testing import GatewayHarness

PROMPTS = ["What is the capital of Norway?",
           "Write a friendly email to our customers announcing new opening hours.",
           "Implement a lock-free queue in C++ and prove that it is linearizable.",
           "Summarize this report in a few sentences for the board."]


def default_config(tmp_path=None):
    """The embedded default, with load_spill reading a port where nothing listens (no Triton here)."""
    data = yaml.safe_load(default_config_text())
    for p in data["plugins"]:
        if p["name"] == "load_spill":
            p["settings"]["metrics_url"] = "http://127.0.0.1:9/metrics"
    if tmp_path is None:
        return parse_config(data)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_explain_matches_what_the_gateway_decides():
    config = default_config()
    explained = await explain(config, [build_body(p) for p in PROMPTS])
    async with GatewayHarness(config=config) as gw:
        served = [await gw.chat(p) for p in PROMPTS]
    assert [e.tier for e in explained] == [r.upstream_headers["x-extproc-tier"] for r in served]
    assert [e.reason for e in explained] == [r.headers["x-extproc-tier-reason"] for r in served]
    assert [e.trace for e in explained] == [r.ctx.route_trace for r in served]
    assert [e.upstream_path for e in explained] == [r.upstream_path for r in served]
    assert [e.tier for e in explained] == ["small", "medium", "large", "medium"]


async def test_explain_leaves_out_plugins_with_no_say_and_isolates_state():
    config = default_config()
    kept, left_out = deciding_plugins(config)
    assert left_out == ["request_log", "usage_records", "metrics"]
    assert "request_log" not in [p.name for p in kept.plugins]
    (e,) = await explain(config.model_copy(update={"state": config.state.model_copy(
        update={"redis_url": "redis://127.0.0.1:9/0"})}), [build_body("hi", model="medium")])
    assert e.status is None and e.tier == "medium" and e.reason == "pinned"  # no Redis was needed


async def test_explain_shows_the_gateways_own_answers():
    config = default_config()
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    (refused, unknown) = await explain(config, [body, build_body("hi", model="gpt-9")])
    assert refused.status == 400 and refused.error["error"]["code"] == "no_capable_tier"
    assert refused.tier is None and "route_rules: not capable" in refused.trace[0]
    assert unknown.status == 404 and unknown.error["error"]["code"] == "model_not_found"
    assert "answered by the gateway: 400 no_capable_tier" in refused.format()


def test_cli_prints_the_decision_chain(tmp_path, capsys):
    path = default_config(tmp_path)
    assert main(["route", "--explain", PROMPTS[2], "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "decision chain:\n  1. semantic_routes: large: nearest large example" in out
    assert "tier: large (model llm-large)   reason: semantic_routes" in out
    assert "upstream: POST /v2/models/llm-large/generate_stream   (not sent)" in out
    assert "not run (no say in routing): request_log, usage_records, metrics" in out
    assert main(["route", "--explain", "hi", "--model", "small", "--json", "--config", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tier"] == "small" and doc["reason"] == "pinned" and doc["trace"] == ["model_tiers: pinned small"]


def test_cli_body_and_headers(tmp_path, capsys):
    path = default_config(tmp_path)
    body = json.dumps({"model": "large", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5})
    assert main(["route", "--body", body, "--header", "x-anything: yes", "--json", "--config", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["tier"] == "large"


@pytest.mark.parametrize("argv,message", [
    (["route"], "give --explain PROMPT"),
    (["route", "--body", "[1, 2]"], "must be a JSON object"),
    (["route", "--body", "{nope"], "bad request body"),
    (["route", "--explain", "hi", "--header", "novalue"], "NAME:VALUE"),
])
def test_cli_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_config_error_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(default_config_text())
    data["plugins"][0]["settings"]["rulez"] = []
    bad.write_text(yaml.safe_dump(data))
    assert main(["route", "--explain", "hi", "--config", str(bad)]) == 2
    assert "plugins[0].settings.rulez: unknown key" in capsys.readouterr().err
    assert load_config(None).plugins[0].name == "route_rules"


async def test_explain_runs_with_the_budget_and_tenancy_policies_of_a_real_config(monkeypatch):
    monkeypatch.setenv("EXTPROC_E2E_BUDGET_PEPPER", "0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("EXTPROC_E2E_ADMIN_TOKEN", "t" * 32)
    config = load_config("tests/e2e/budgets-e2e.yaml")  # tenancy, context caps, budgets, admin API
    (anonymous,) = await explain(config, [build_body("hello")])
    # no API key: 401 from tenancy, exactly what the gateway would answer
    assert anonymous.status == 401 and anonymous.error["error"]["code"] == "missing_api_key"
    (trusted,) = await explain(config, [build_body("hello", model="medium")],
                               headers={"x-extproc-tenant": "t-conc"})  # as Envoy would set it
    assert trusted.status is None and trusted.tier == "medium"
    assert "admin_api" in trusted.left_out  # it starts a server; it has no say in routing
