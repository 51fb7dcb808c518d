"""The metrics plugin: each shared context fact becomes the right metric, with bounded labels."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from extproc import hookimpl
from extproc.framework.config import default_config_text, parse_config
from extproc.observability.metrics import BoundedLabel, get_metrics
from extproc.framework.testing import GatewayHarness


class Facts:
    """Records on the context what other policies would (tenant, cache, budget, routing...)."""

    @hookimpl
    def extproc_request_parsed(self, ctx):
        text = ctx.request.messages[-1].text
        ctx.tenant = "acme" if "acme" in text else ("tenant-" + text.split()[-1])
        ctx.workflow = "support"
        ctx.cache_status = "miss"
        ctx.cache_lookups += [("exact", "miss"), ("semantic", "miss")]
        ctx.tokens_saved, ctx.cost_saved_usd, ctx.tokens_cut = 7, 0.5, 3
        ctx.budget_status = "ok"
        ctx.embedding_calls = 1
        ctx.route_trace.append("router: short prompt")
        if "over budget" in text:
            ctx.budget_status = "rejected:monthly"
            raise __import__("extproc").OpenAIError(429, "Budget exceeded.", code="budget_exceeded")
        if "boom" in text:
            raise RuntimeError("boom")


def cfg(metrics_settings=None):
    data = yaml.safe_load(default_config_text())
    data["plugins"] = [{"name": "model_tiers"},
                       {"name": "metrics", "on_error": "fail_open", "settings": metrics_settings or {}}]
    return parse_config(data)


def value(name, **labels):
    return get_metrics().registry.get_sample_value(name, labels) or 0.0


class Delta:
    """Sample values before/after, so tests are independent of the process-wide counters."""

    def __init__(self, *keys):
        self.keys = keys
        self.before = [value(n, **ls) for n, ls in keys]

    def __call__(self):
        return [value(n, **ls) - b for (n, ls), b in zip(self.keys, self.before)]


WHO = {"tenant": "acme", "workflow": "support", "tier": "medium"}


async def test_request_facts_become_metrics():
    d = Delta(("extproc_requests_total", {**WHO, "outcome": "completed"}),
              ("extproc_tokens_total", {**WHO, "kind": "prompt"}),
              ("extproc_tokens_total", {**WHO, "kind": "completion"}),
              ("extproc_tokens_total", {**WHO, "kind": "saved"}),
              ("extproc_tokens_total", {**WHO, "kind": "cut"}),
              ("extproc_cost_usd_total", {**WHO, "kind": "prompt"}),
              ("extproc_cost_usd_total", {**WHO, "kind": "completion"}),
              ("extproc_cost_saved_usd_total", WHO),
              ("extproc_cache_requests_total", {"tier": "medium", "status": "miss"}),
              ("extproc_cache_lookups_total", {"layer": "semantic", "result": "miss"}),
              ("extproc_budget_decisions_total", {"tenant": "acme", "status": "ok"}),
              ("extproc_routing_decisions_total", {"tier": "medium", "reason": "pinned"}),
              ("extproc_route_steps_total", {"plugin": "router"}),
              ("extproc_embedding_calls_total", {"tenant": "acme", "workflow": "support"}),
              ("extproc_responses_total", {"tier": "medium", "code": "200"}),
              ("extproc_time_to_first_token_seconds_count", {"tier": "medium", "stream": "true"}),
              ("extproc_upstream_duration_seconds_count", {"tier": "medium"}),
              ("extproc_phase_duration_seconds_count", {"phase": "response_body"}),
              ("extproc_plugin_duration_seconds_count", {"plugin": "Facts"}),
              ("extproc_request_duration_seconds_count", {"tier": "medium", "outcome": "completed"}))
    async with GatewayHarness(Facts, config=cfg({"tenants": ["acme"], "workflows": ["support"]})) as gw:
        result = await gw.chat("hello acme", model="medium", stream=True, answer="one two three")
    assert result.status == 200
    assert d() == [1, 5, 3, 7, 3, pytest.approx(5 * 0.0005 / 1000), pytest.approx(3 * 0.0015 / 1000), 0.5,
                   1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]


async def test_unconfigured_tenants_are_labelled_other_and_cardinality_stays_bounded():
    other = {"tenant": "other", "workflow": "support", "tier": "small"}
    d = Delta(("extproc_requests_total", {**other, "outcome": "completed"}))
    async with GatewayHarness(Facts, config=cfg({"workflows": ["support"]})) as gw:
        for i in range(30):
            await gw.chat(f"hello {i}", model="small")
    assert d() == [30]
    tenants = {s.labels["tenant"] for m in get_metrics().registry.collect() if m.name == "extproc_requests"
               for s in m.samples}
    assert not any(t.startswith("tenant-") for t in tenants)


def test_bounded_label():
    label = BoundedLabel(["a"], dynamic=2)
    assert [label(v) for v in ("a", "x", "y", "z", "x", None)] == ["a", "x", "y", "other", "x", "none"]


async def test_budget_rejections_and_replies_are_counted():
    d = Delta(("extproc_budget_rejections_total", {"tenant": "acme", "budget": "monthly"}),
              ("extproc_requests_total", {"tenant": "acme", "workflow": "support", "tier": "none",
                                          "outcome": "replied"}),
              ("extproc_responses_total", {"tier": "none", "code": "429"}))
    async with GatewayHarness(Facts, config=cfg({"tenants": ["acme"], "workflows": ["support"]})) as gw:
        result = await gw.chat("acme over budget")
    assert result.status == 429
    assert d() == [1, 1, 1]


async def test_plugin_failures_from_the_hook_runner_are_exported():
    d = Delta(("extproc_plugin_failures_total", {"plugin": "Facts", "hook": "extproc_request_parsed"}),
              ("extproc_degraded_requests_total", {"plugin": "Facts"}))
    async with GatewayHarness(Facts, config=cfg(), on_error="fail_open") as gw:
        result = await gw.chat("acme boom")
        assert result.status == 200 and result.headers["x-extproc-degraded"] == "Facts"
        assert d() == [1, 1]
        await gw.chat("acme boom")
    assert d() == [2, 2]


async def test_a_failing_metrics_plugin_never_costs_the_request(monkeypatch):
    from extproc_plugins.observability import metrics as plugin

    @hookimpl
    def broken(self, ctx):
        raise RuntimeError("metrics bug")

    monkeypatch.setattr(plugin.Metrics, "extproc_request_finished", broken)
    async with GatewayHarness(config=cfg()) as gw:
        result = await gw.chat("hello", model="small")
        assert result.status == 200 and result.json()["choices"][0]["message"]["content"]
        assert gw.gateway.hooks.failures[("metrics", "extproc_request_finished")] == 1


async def test_concurrent_requests_count_exactly():
    who = {"tenant": "anonymous", "workflow": "none", "tier": "small"}
    d = Delta(("extproc_requests_total", {**who, "outcome": "completed"}),
              ("extproc_tokens_total", {**who, "kind": "completion"}))
    async with GatewayHarness(config=cfg()) as gw:
        await asyncio.gather(*[gw.chat(f"hi {i}", model="small", answer="a b c d") for i in range(200)])
    assert d() == [200, 800]
