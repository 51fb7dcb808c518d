"""route_rules: capability/context narrowing and YAML rules, through the real lifecycle.

What each bad input gets: a request needing a capability no tier has -> 400 no_capable_tier;
a prompt too long for every tier's context window -> 400 context_length_exceeded; a pinned tier a
rule removed -> 403 model_not_allowed (or rerouted with pinned: reroute); a bad rule -> start-up
configuration error naming it.
"""

from __future__ import annotations

import pytest

from extproc.framework.config import ConfigError
from extproc.framework.testing import GatewayHarness
from extproc_plugins.routing.route_rules import RouteRules

from .routing_helpers import RequestFacts, config_with

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def harness(rules=(), *, tiers_update=None, **settings):
    config = config_with(("route_rules", {"rules": list(rules), **settings}), tiers_update=tiers_update)
    return GatewayHarness(RequestFacts, config=config)


def tier(result) -> str:
    return result.upstream_headers["x-extproc-tier"]


async def test_no_rules_leaves_auto_to_the_default_tier():
    async with harness() as gw:
        r = await gw.chat("hello")
    assert tier(r) == "small" and r.headers["x-extproc-tier-reason"] == "default"


async def test_tenant_rule_narrows_and_a_pinned_forbidden_tier_is_refused_403():
    rules = [{"name": "free_plan", "when": {"tenants": ["free"]}, "deny": ["large"]}]
    async with harness(rules) as gw:
        refused = await gw.chat("hi", model="large", headers={"x-test-tenant": "free"})
        paying = await gw.chat("hi", model="large", headers={"x-test-tenant": "acme"})
        alias = await gw.chat("hi", model="llm-large", headers={"x-test-tenant": "free"})
    assert refused.status == 403
    err = refused.json()["error"]
    assert err["code"] == "model_not_allowed" and err["param"] == "model"
    assert refused.ctx.route_trace == ["route_rules: rule free_plan removed large",
                                       "route_rules: rule free_plan: pinned large not allowed",
                                       "model_tiers: pinned large is not allowed: 403"]
    assert alias.status == 403  # an alias of a removed tier is refused too
    assert tier(paying) == "large" and paying.headers["x-extproc-tier-reason"] == "pinned"


async def test_pinned_reroute_sends_a_forbidden_pin_to_the_nearest_allowed_tier_below():
    rules = [{"name": "free_plan", "when": {"tenants": ["free"]}, "deny": ["large"], "pinned": "reroute"}]
    async with harness(rules) as gw:
        r = await gw.chat("hi", model="large", headers={"x-test-tenant": "free"})
    assert r.status == 200 and tier(r) == "medium"
    assert r.headers["x-extproc-tier-reason"] == "route_rules:free_plan"
    assert r.upstream_path == "/v2/models/llm-medium/generate_stream"


async def test_allow_list_keeps_only_the_listed_tiers_for_auto():
    rules = [{"name": "batch", "when": {"workflows": ["nightly"]}, "allow": ["medium"]}]
    async with harness(rules) as gw:
        r = await gw.chat("hello", headers={"x-test-workflow": "nightly"})
        other = await gw.chat("hello", headers={"x-test-workflow": "interactive"})
    # the default tier (small) was removed: model_tiers takes the first allowed one
    assert tier(r) == "medium" and tier(other) == "small"


async def test_first_matching_rule_with_a_tier_decides_and_only_for_auto():
    rules = [
        {"name": "code", "when": {"patterns": ["```", r"\bdef \w+\("]}, "tier": "large"},
        {"name": "long", "when": {"min_prompt_tokens": 50}, "tier": "medium"},
        {"name": "batch", "when": {"workflows": ["nightly"]}, "tier": "small"},
    ]
    async with harness(rules) as gw:
        code = await gw.chat("why does ```x = 1``` fail? " + "word " * 60)
        long = await gw.chat("word " * 60)
        batch = await gw.chat("hi", headers={"x-test-workflow": "nightly"})
        pinned = await gw.chat("def f(x): pass", model="small")
        case = await gw.chat("DEF F(X): pass")  # patterns are case-insensitive by default
    assert tier(code) == "large" and code.headers["x-extproc-tier-reason"] == "route_rules:code"
    assert tier(long) == "medium" and long.headers["x-extproc-tier-reason"] == "route_rules:long"
    assert tier(batch) == "small" and batch.headers["x-extproc-tier-reason"] == "route_rules:batch"
    assert tier(pinned) == "small" and pinned.headers["x-extproc-tier-reason"] == "pinned"
    assert tier(case) == "large"


async def test_token_bounds_are_inclusive_and_both_apply():
    rules = [{"name": "mid", "when": {"min_prompt_tokens": 10, "max_prompt_tokens": 20}, "tier": "medium"}]
    async with harness(rules) as gw:
        short = await gw.chat("hi")
        mid = await gw.chat("one two three four five six seven eight")
        long = await gw.chat("word " * 40)
    assert [tier(short), tier(mid), tier(long)] == ["small", "medium", "small"]
    assert 10 <= mid.ctx.prompt_tokens_estimate <= 20


async def test_a_decided_tier_a_rule_removed_becomes_the_nearest_allowed_one():
    rules = [{"name": "free_plan", "when": {"tenants": ["free"]}, "deny": ["large"]},
             {"name": "code", "when": {"patterns": ["```"]}, "tier": "large"}]
    async with harness(rules) as gw:
        r = await gw.chat("fix ```this```", headers={"x-test-tenant": "free"})
    assert tier(r) == "medium"
    assert "route_rules: rule code matched: medium (nearest allowed to large)" in r.ctx.route_trace


async def test_endpoint_and_stream_conditions():
    rules = [{"name": "streams", "when": {"stream": True, "endpoints": ["chat"]}, "tier": "medium"}]
    async with harness(rules) as gw:
        streamed = await gw.chat("hi", stream=True)
        plain = await gw.chat("hi")
        completion = await gw.send({"model": "auto", "prompt": "hi", "stream": True}, path="/v1/completions")
    assert tier(streamed) == "medium" and tier(plain) == "small" and tier(completion) == "small"


# ---------------------------------------------------------------------------- capabilities


async def test_auto_request_needing_tools_goes_to_the_only_capable_tier():
    async with harness(tiers_update={"large": {"capabilities": ["tools", "json_mode"]}}) as gw:
        tools = await gw.chat("look it up", tools=TOOLS)
        json_mode = await gw.chat("as json", response_format={"type": "json_object"})
    # Triton tiers refuse tools themselves (400 unsupported_parameter) -- but the route is right:
    assert tools.ctx.tier == "large" and json_mode.ctx.tier == "large"
    assert "route_rules: not capable: small (no tools); medium (no tools)" in tools.ctx.route_trace


async def test_no_capable_tier_is_a_400_naming_what_is_missing():
    async with harness() as gw:
        r = await gw.chat("look it up", tools=TOOLS)
        j = await gw.chat("as json", response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert r.status == 400
    err = r.json()["error"]
    assert err["code"] == "no_capable_tier" and err["param"] == "tools" and "needs tools" in err["message"]
    assert j.status == 400 and j.json()["error"]["param"] == "response_format"


async def test_capabilities_are_not_checked_for_pinned_requests():
    async with harness() as gw:
        r = await gw.chat("look it up", model="small", tools=TOOLS)
    # pinned means pinned: the Triton path itself refuses tools
    assert r.status == 400 and r.json()["error"]["code"] == "unsupported_parameter"


async def test_context_window_narrows_to_tiers_that_hold_the_prompt():
    async with harness() as gw:  # small 2048, medium 4096, large 8192 tokens
        r = await gw.chat("word " * 3000)
        too_long = await gw.chat("word " * 9000)
        budget = await gw.chat("word " * 1900, max_tokens=500)  # prompt fits small, prompt+answer does not
    assert tier(r) == "medium"  # small removed; model_tiers takes the first allowed
    assert any("small (context" in s for s in r.ctx.route_trace)
    assert too_long.status == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert too_long.json()["error"]["param"] == "messages"
    assert tier(budget) == "medium"


async def test_capabilities_can_be_turned_off():
    async with harness(capabilities=False) as gw:
        fits = await gw.chat("word " * 10)
        r = await gw.chat("word " * 9000)
    assert tier(fits) == "small"
    # not narrowed to a tier that fits: the default tier takes it, and its window refuses it
    assert r.status == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert any("small" in s for s in r.ctx.route_trace) or r.ctx.tier == "small"


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("rules,match", [
    ([{"name": "x", "when": {"patterns": ["(unclosed"]}, "tier": "large"}], "not a valid regular expression"),
    ([{"name": "x", "when": {}}], "has no action"),
    ([{"name": "x", "tier": "large", "colour": "red"}], "unknown key"),
    ([{"name": "x", "tier": "large"}, {"name": "x", "tier": "small"}], "used twice"),
    ([{"name": "has space", "tier": "large"}], "name"),
])
def test_bad_rules_fail_at_load_naming_the_key(rules, match):
    from extproc.framework.gateway import Gateway

    with pytest.raises(ConfigError, match=match):
        Gateway(config_with(("route_rules", {"rules": rules})))


async def test_unknown_tier_in_a_rule_stops_start_up():
    config = config_with(("route_rules", {"rules": [{"name": "x", "tier": "huge"}]}))
    with pytest.raises(Exception, match="unknown tier.*'huge'"):
        async with GatewayHarness(config=config):
            pass


async def test_a_bug_in_the_policy_fails_closed_with_500(monkeypatch):
    monkeypatch.setattr(RouteRules, "_choose", lambda self, ctx, c: 1 / 0)
    async with harness() as gw:
        r = await gw.chat("hi")
    assert r.status == 500 and r.json()["error"]["code"] == "plugin_error"
    assert "route_rules" in r.json()["error"]["message"]


async def test_require_rule_keeps_tiers_with_the_capabilities(caplog):
    rules = [{"name": "legal", "when": {"workflows": ["contracts"]}, "require": ["long_context"]}]
    update = {"large": {"capabilities": ["long_context"]}, "medium": {"capabilities": ["tol"]}}
    async with harness(rules, tiers_update=update) as gw:
        r = await gw.chat("review this clause", headers={"x-test-workflow": "contracts"})
        pinned = await gw.chat("review this clause", model="small", headers={"x-test-workflow": "contracts"})
    assert tier(r) == "large" and "route_rules: rule legal removed small, medium" in r.ctx.route_trace
    assert pinned.status == 403  # a pinned tier without it is refused like any removed tier
    assert "tiers.medium.capabilities: tol: no request or rule asks for it" in caplog.text
