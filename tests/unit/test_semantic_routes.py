"""semantic_routes: nearest example utterances (real all-MiniLM-L6-v2) decide the tier."""

from __future__ import annotations

import asyncio

import pytest

from extproc.framework.testing import GatewayHarness

from .routing_helpers import RequestFacts, config_with

ROUTES = {
    "small": ["Extract the email address from this text.", "What is the capital of a country?"],
    "medium": ["Write a polite email to a customer.", "Summarize this article in a few sentences."],
    "large": ["Prove this theorem step by step.", "Write a function and analyze its complexity."],
}


def harness(*extra, **settings):
    return GatewayHarness(RequestFacts, config=config_with(*extra, ("semantic_routes", settings)))


def tier(result) -> str:
    return result.upstream_headers["x-extproc-tier"]


async def test_prompts_go_to_the_tier_of_their_nearest_examples():
    async with harness(routes=ROUTES, threshold=0.4) as gw:
        small = await gw.chat("Extract the e-mail addresses in this message: bob@example.com")
        medium = await gw.chat("Please summarize this news article in three sentences.")
        large = await gw.chat("Prove the following theorem, step by step, with every detail.")
    assert (tier(small), tier(medium), tier(large)) == ("small", "medium", "large")
    assert large.headers["x-extproc-tier-reason"] == "semantic_routes"
    (step,) = large.ctx.route_trace[:1]
    assert step.startswith("semantic_routes: large: nearest large example 'Prove this theorem step by step.'")
    assert large.ctx.embedding_calls == 1


async def test_nothing_close_enough_passes_or_takes_the_default_tier():
    async with harness(routes=ROUTES, threshold=0.95) as gw:
        passed = await gw.chat("Show that there are infinitely many primes.")
    assert tier(passed) == "small" and passed.headers["x-extproc-tier-reason"] == "default"
    assert "nothing close enough" in passed.ctx.route_trace[0] and passed.ctx.route_trace[0].endswith("pass")
    async with harness(routes=ROUTES, threshold=0.95, default_tier="medium") as gw:
        defaulted = await gw.chat("Show that there are infinitely many primes.")
    assert tier(defaulted) == "medium" and defaulted.headers["x-extproc-tier-reason"] == "semantic_routes:default"


async def test_a_removed_tier_goes_to_the_nearest_allowed_one():
    rules = {"rules": [{"name": "no_large", "when": {}, "deny": ["large"]}]}
    async with harness(("route_rules", rules), routes=ROUTES, threshold=0.4) as gw:
        r = await gw.chat("Prove the following theorem, step by step, with every detail.")
    assert tier(r) == "medium"
    assert "(nearest allowed to large)" in r.ctx.route_trace[-1]


async def test_pinned_requests_are_not_embedded():
    async with harness(routes=ROUTES) as gw:
        r = await gw.chat("Prove the following theorem, step by step.", model="small")
    assert tier(r) == "small" and r.ctx.embedding_calls == 0 and r.ctx.route_trace == ["model_tiers: pinned small"]


async def test_shipped_utterances_route_typical_prompts():
    async with harness() as gw:  # extproc_plugins/routing/data/route_utterances.yaml, threshold 0.5
        r = await gw.chat("Summarize this report in a few sentences for the board.")
    assert tier(r) == "medium"


async def test_concurrent_requests_each_get_their_own_decision():
    prompts = {"small": "Extract the email address from this text: ann@example.org",
               "medium": "Write a polite email to a customer about a delay.",
               "large": "Prove this theorem step by step: there are infinitely many primes."}
    async with harness(routes=ROUTES, threshold=0.4) as gw:
        order = [t for t in prompts for _ in range(6)]
        results = await asyncio.gather(*(gw.chat(prompts[t]) for t in order))
    assert [tier(r) for r in results] == order


async def test_routes_file(tmp_path):
    f = tmp_path / "routes.yaml"
    f.write_text("large:\n  - Prove this theorem step by step.\nsmall:\n  - What is the capital of Peru?\n")
    async with harness(routes_file=str(f), threshold=0.4) as gw:
        r = await gw.chat("Prove this theorem step by step, please.")
    assert tier(r) == "large"


@pytest.mark.parametrize("settings,match", [
    ({"routes": {"huge": ["x"]}}, "unknown tier.*'huge'"),
    ({"routes": {"small": []}}, "no example utterances"),
    ({"routes": ROUTES, "routes_file": "x.yaml"}, "not both"),
    ({"routes_file": "/nonexistent/routes.yaml"}, "cannot read"),
    ({"routes": ROUTES, "default_tier": "huge"}, "unknown tier.*'huge'"),
])
async def test_bad_settings_stop_start_up(settings, match):
    with pytest.raises(Exception, match=match):  # the start-up failure names the ConfigError
        async with harness(**settings):
            pass


async def test_bad_routes_file_shape(tmp_path):
    f = tmp_path / "routes.yaml"
    f.write_text("small: just a string\n")
    with pytest.raises(Exception, match="must map each tier to a list"):
        async with harness(routes_file=str(f)):
            pass


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
async def test_encoder_failure_follows_the_failure_policy(monkeypatch, on_error):
    from extproc.embeddings import prompt as prompts
    from extproc.framework.config import PluginEntry

    async def broken(ctx, embedder=None):
        raise RuntimeError("encoder down")

    cfg = config_with().model_copy(update={"plugins": [
        PluginEntry(name="semantic_routes", on_error=on_error, settings={"routes": ROUTES}),
        PluginEntry(name="model_tiers")]})
    async with GatewayHarness(config=cfg) as gw:
        monkeypatch.setattr(prompts, "prompt_embedding", broken)
        r = await gw.chat("Prove this theorem.")
    if on_error == "fail_closed":
        assert r.status == 500 and r.json()["error"]["code"] == "plugin_error"
    else:  # the request goes on without the policy, flagged
        assert r.status == 200 and tier(r) == "small"
        assert r.headers["x-extproc-degraded"] == "semantic_routes"


async def test_a_fail_open_policy_whose_start_up_failed_is_flagged_on_every_auto_request():
    from extproc.framework.config import PluginEntry

    cfg = config_with().model_copy(update={"plugins": [
        PluginEntry(name="semantic_routes", on_error="fail_open", settings={"routes_file": "/nonexistent.yaml"}),
        PluginEntry(name="learned_router", on_error="fail_open", settings={"model_path": "/nonexistent.json"}),
        PluginEntry(name="model_tiers")]})
    async with GatewayHarness(config=cfg) as gw:  # start-up failures are logged, the worker serves
        r = await gw.chat("Prove this theorem.")
        pinned = await gw.chat("Prove this theorem.", model="large")
    assert r.status == 200 and tier(r) == "small"
    assert r.headers["x-extproc-degraded"] == "semantic_routes,learned_router"
    assert "x-extproc-degraded" not in pinned.headers
