"""The policies that move a chosen tier (extproc_adjust_tier): budget_downgrade and load_spill.

load_spill reads a real HTTP metrics endpoint served here with Triton's Prometheus text, so the
scrape, the parse, the cache and the failure handling are the production code paths.
"""

from __future__ import annotations

import asyncio

import pytest

from extproc.framework.config import PluginEntry, load_config
from extproc.framework.testing import GatewayHarness
from extproc.observability.triton_metrics import parse_metrics, parse_selector

from .routing_helpers import RequestFacts, config_with

LARGE = "Implement a lock-free queue in C++ and prove that it is linearizable."
OVER = {"x-test-over-soft-budget": "1"}


def tier(result) -> str:
    return result.upstream_headers["x-extproc-tier"]


# ---------------------------------------------------------------------------- budget_downgrade


def budget_harness(**settings):
    rules = ("route_rules", {"rules": [{"name": "to_large", "when": {"patterns": ["queue"]}, "tier": "large"},
                                       {"name": "to_medium", "when": {"patterns": ["email"]}, "tier": "medium"}]})
    return GatewayHarness(RequestFacts, config=config_with(rules, ("budget_downgrade", settings)))


async def test_over_soft_budget_moves_one_tier_down():
    async with budget_harness() as gw:
        down = await gw.chat(LARGE, headers=OVER)
        mid = await gw.chat("write an email", headers=OVER)
        cheapest = await gw.chat("hello", headers=OVER)
        within = await gw.chat(LARGE)
    assert tier(down) == "medium" and down.headers["x-extproc-tier-reason"] == "budget_downgrade"
    assert down.ctx.route_trace[-1] == "budget_downgrade: over soft budget: large -> medium"
    assert down.upstream_path == "/v2/models/llm-medium/generate_stream"
    assert tier(mid) == "small"
    assert tier(cheapest) == "small"
    assert cheapest.ctx.route_trace[-1] == "budget_downgrade: over soft budget; small is already the cheapest allowed"
    assert tier(within) == "large" and within.headers["x-extproc-tier-reason"] == "route_rules:to_large"


async def test_pinned_requests_keep_their_tier_unless_configured():
    async with budget_harness() as gw:
        kept = await gw.chat("hi", model="large", headers=OVER)
    assert tier(kept) == "large" and kept.headers["x-extproc-tier-reason"] == "pinned"
    assert "pinned to large: kept" in kept.ctx.route_trace[-1]
    async with budget_harness(pinned=True) as gw:
        moved = await gw.chat("hi", model="large", headers=OVER)
    assert tier(moved) == "medium"


async def test_steps_floor_and_disallowed_tiers():
    async with budget_harness(steps=2) as gw:
        r = await gw.chat(LARGE, headers=OVER)
    assert tier(r) == "small"
    async with budget_harness(steps=2, floor="medium") as gw:
        r = await gw.chat(LARGE, headers=OVER)
    assert tier(r) == "medium"
    deny_medium = ("route_rules", {"rules": [{"name": "no_medium", "deny": ["medium"]},
                                             {"name": "q", "when": {"patterns": ["queue"]}, "tier": "large"}]})
    async with GatewayHarness(RequestFacts, config=config_with(deny_medium, "budget_downgrade")) as gw:
        r = await gw.chat(LARGE, headers=OVER)
    assert tier(r) == "small"  # one step down the allowed ladder


async def test_budget_downgrade_bad_floor_stops_start_up():
    with pytest.raises(Exception, match="floor: unknown tier 'tiny'"):
        async with budget_harness(floor="tiny"):
            pass


# ---------------------------------------------------------------------------- load_spill


def triton_text(depths: dict[str, float], waiting: dict[str, float] | None = None) -> str:
    lines = ["# HELP nv_inference_pending_request_count Instantaneous number of pending requests.",
             "# TYPE nv_inference_pending_request_count gauge"]
    lines += [f'nv_inference_pending_request_count{{model="{m}",version="1"}} {d}' for m, d in depths.items()]
    if waiting:
        lines += ["# TYPE nv_trt_llm_request_metrics gauge"]
        for m, d in waiting.items():
            lines += [f'nv_trt_llm_request_metrics{{model="{m}",request_type="waiting",version="1"}} {d}',
                      f'nv_trt_llm_request_metrics{{model="{m}",request_type="active",version="1"}} 99']
    return "\n".join(lines) + "\n"


class MetricsServer:
    """A real HTTP endpoint answering GET /metrics with whatever ``text`` holds (or failing)."""

    def __init__(self):
        self.text = triton_text({})
        self.status = 200
        self.hits = 0
        self.server = None

    async def _handle(self, reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        self.hits += 1
        body = self.text.encode()
        writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(body)}\r\n"
                     f"Content-Type: text/plain\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/metrics"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


def spill_harness(url, **settings):
    rules = ("route_rules", {"rules": [{"name": "to_large", "when": {"patterns": ["queue"]}, "tier": "large"},
                                       {"name": "to_small", "when": {"patterns": ["tiny"]}, "tier": "small"}]})
    settings = {"metrics_url": url, "max_depth": {"large": 4, "medium": 8}, "max_age": 0.05, **settings}
    return GatewayHarness(RequestFacts, config=config_with(rules, ("load_spill", settings)))


async def test_deep_queue_spills_to_the_nearest_allowed_tier_and_comes_back():
    async with MetricsServer() as m:
        async with spill_harness(m.url) as gw:
            m.text = triton_text({"llm-large": 3, "llm-medium": 0})
            calm = await gw.chat(LARGE)
            m.text = triton_text({"llm-large": 12, "llm-medium": 2})
            await asyncio.sleep(0.06)  # past max_age
            spilled = await gw.chat(LARGE)
            m.text = triton_text({"llm-large": 0, "llm-medium": 0})
            await asyncio.sleep(0.06)
            back = await gw.chat(LARGE)
    assert tier(calm) == "large" and calm.ctx.route_trace[-1] == "load_spill: large queue 3 <= 4"
    assert tier(spilled) == "medium" and spilled.headers["x-extproc-tier-reason"] == "load_spill"
    assert spilled.ctx.route_trace[-1] == "load_spill: large queue 12 > 4: spilled to medium (queue 2)"
    assert spilled.upstream_path == "/v2/models/llm-medium/generate_stream"
    assert tier(back) == "large"


async def test_every_alternative_busy_keeps_the_choice_and_prefer_up():
    async with MetricsServer() as m:
        m.text = triton_text({"llm-large": 12, "llm-medium": 20})
        async with spill_harness(m.url) as gw:
            r = await gw.chat(LARGE)  # small is unbounded: it takes the spill
        assert tier(r) == "small"
        async with spill_harness(m.url, max_depth={"large": 4, "medium": 8, "small": 1}) as gw:
            m.text = triton_text({"llm-large": 12, "llm-medium": 20, "llm-small": 5})
            kept = await gw.chat(LARGE)
        assert tier(kept) == "large"
        assert "every alternative is busy: medium 20, small 5" in kept.ctx.route_trace[-1]
        async with spill_harness(m.url, max_depth={"small": 1}, prefer="up") as gw:
            m.text = triton_text({"llm-large": 0, "llm-medium": 0, "llm-small": 5})
            up = await gw.chat("tiny")
        assert tier(up) == "medium"


async def test_pinned_requests_are_not_spilled_unless_configured():
    async with MetricsServer() as m:
        m.text = triton_text({"llm-large": 50})
        async with spill_harness(m.url) as gw:
            pinned = await gw.chat("hi", model="large")
        async with spill_harness(m.url, pinned=True) as gw:
            spilled = await gw.chat("hi", model="large")
    assert tier(pinned) == "large" and tier(spilled) == "medium"


async def test_queue_metrics_selectors_sum_per_model():
    async with MetricsServer() as m:
        m.text = triton_text({"llm-large": 1}, waiting={"llm-large": 4})
        async with spill_harness(m.url) as gw:  # default: pending + TRT-LLM waiting = 5 > 4
            r = await gw.chat(LARGE)
        assert tier(r) == "medium"
        async with spill_harness(m.url, queue_metrics=["nv_inference_pending_request_count"]) as gw:
            r = await gw.chat(LARGE)
        assert tier(r) == "large"
        # a tier whose metrics use another model label (TensorRT-LLM's ensemble: tensorrt_llm)
        m.text = triton_text({}, waiting={"tensorrt_llm": 9})
        async with spill_harness(m.url, models={"large": "tensorrt_llm"}) as gw:
            r = await gw.chat(LARGE)
        assert tier(r) == "medium"


async def test_unreadable_metrics_fail_open_with_a_trace_and_are_not_hammered():
    async with MetricsServer() as m:
        m.status = 500
        async with spill_harness(m.url, max_age=5.0) as gw:
            results = [await gw.chat(LARGE) for _ in range(5)]
            spill = next(p.obj for p in gw.gateway.hooks.plugins if p.name == "load_spill")
        assert all(tier(r) == "large" and r.status == 200 for r in results)
        assert "metrics unavailable" in results[0].ctx.route_trace[-1]
        assert "x-extproc-degraded" not in results[0].headers  # deliberate: a decision, not a failure
        assert m.hits == 1 and spill.failures == 5  # the failure is cached for max_age
    async with spill_harness("http://127.0.0.1:9/metrics", timeout=0.2) as gw:  # nothing listens
        r = await gw.chat(LARGE)
    assert tier(r) == "large" and "metrics unavailable" in r.ctx.route_trace[-1]


async def test_concurrent_requests_share_one_scrape():
    async with MetricsServer() as m:
        m.text = triton_text({"llm-large": 9})
        async with spill_harness(m.url, max_age=10.0) as gw:
            results = await asyncio.gather(*(gw.chat(LARGE) for _ in range(16)))
    assert all(tier(r) == "medium" for r in results)
    assert m.hits == 1


async def test_openai_tiers_have_no_queue_to_read():
    config = load_config("tests/e2e/gateway-e2e.yaml")
    async with MetricsServer() as m:
        m.text = triton_text({"llm-large": 50})
        cfg = config.model_copy(update={"plugins": [
            PluginEntry(name="route_rules", settings={"rules": [{"name": "q", "when": {"patterns": ["queue"]},
                                                                 "tier": "large"}]}),
            PluginEntry(name="load_spill", settings={"metrics_url": m.url, "max_depth": {"large": 1},
                                                     "ladder": ["small", "medium", "large", "passthrough"],
                                                     "prefer": "up"}),
            PluginEntry(name="model_tiers")]})
        async with GatewayHarness(config=cfg) as gw:
            r = await gw.chat(LARGE)
    assert r.ctx.tier == "passthrough"
    assert "spilled to passthrough (no queue to read)" in r.ctx.route_trace[-1]


@pytest.mark.parametrize("settings,match", [
    ({"max_depth": {"huge": 1}}, "max_depth: unknown tier"),
    ({"queue_metrics": ["bad selector{"]}, "bad metric selector"),
    ({"queue_metrics": []}, "at least one queue metric"),
])
async def test_load_spill_bad_settings(settings, match):
    with pytest.raises(Exception, match=match):
        async with spill_harness("http://127.0.0.1:9/metrics", **settings):
            pass


def test_metric_selectors():
    assert parse_selector('x{a="1", b=2}') == ("x", {"a": "1", "b": "2"})
    with pytest.raises(ValueError):
        parse_selector("x{a}")
    loads, _ = parse_metrics(triton_text({"m": 2}, waiting={"m": 3}),
                             ['nv_trt_llm_request_metrics{request_type="waiting"}', "nv_trt_llm_request_metrics",
                              "nv_inference_pending_request_count"])
    extra = loads["m"].extra
    assert extra['nv_trt_llm_request_metrics{request_type="waiting"}'] == 3
    assert extra["nv_trt_llm_request_metrics"] == 102 and extra["nv_inference_pending_request_count"] == 2
    assert loads["m"].pending == 2
