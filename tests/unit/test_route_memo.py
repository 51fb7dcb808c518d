"""Remembered routing decisions (extproc_plugins/routing/route_memo.py): a repeated ``auto`` prompt
is routed without its embedding, per tenant, bounded, and never across configurations."""

from __future__ import annotations

from extproc.framework.context import RequestContext, TierChoice
from extproc.framework.testing import GatewayHarness
from extproc_plugins.routing.route_memo import RouteMemo

from .routing_helpers import RequestFacts, config_with

ROUTES = {
    "small": ["Extract the email address from this text.", "What is the capital of a country?"],
    "medium": ["Write a polite email to a customer.", "Summarize this article in a few sentences."],
    "large": ["Prove this theorem step by step.", "Write a function and analyze its complexity."],
}
LARGE = "Prove this theorem about graph colouring step by step, leaving out no detail."
UNCLEAR = "Tell me whether there exist infinitely many twin primes."  # nothing close at 0.95: semantic_routes passes
EMBEDDED = "routing.embedding"  # prompt_embedding's per-request key: set whenever a policy asked for it


def chain(*extra, routes_settings=None, learned=None):
    semantic = {"routes": ROUTES, "threshold": 0.4, **(routes_settings or {})}
    return GatewayHarness(RequestFacts, config=config_with(
        *extra, ("semantic_routes", semantic), ("learned_router", learned or {})))


def tier(result) -> str:
    return result.upstream_headers["x-extproc-tier"]


def embedded(result) -> bool:
    return EMBEDDED in result.ctx.plugin_state


async def test_a_repeated_auto_prompt_is_routed_from_memory_without_the_embedding():
    async with chain() as gw:
        first = await gw.chat(LARGE)
        again = await gw.chat(LARGE)
    assert embedded(first) and not embedded(again)
    assert (tier(again), again.headers["x-extproc-tier-reason"]) == (tier(first), "semantic_routes") == ("large", "semantic_routes")
    assert again.ctx.route_trace[0].startswith("route_memo: semantic_routes large: nearest large example")
    assert again.ctx.route_trace[0].endswith("(remembered)")
    assert not any(step.startswith(("semantic_routes:", "learned_router:")) for step in again.ctx.route_trace)


async def test_a_remembered_pass_hands_over_to_the_next_policy_which_remembers_its_own():
    async with chain(routes_settings={"threshold": 0.95}) as gw:
        first = await gw.chat(UNCLEAR)
        again = await gw.chat(UNCLEAR)
    assert first.headers["x-extproc-tier-reason"] == again.headers["x-extproc-tier-reason"] == "learned_router"
    assert tier(first) == tier(again) and not embedded(again)
    memo_steps = [s for s in again.ctx.route_trace if s.startswith("route_memo:")]
    assert [s.split()[1] for s in memo_steps] == ["semantic_routes", "learned_router"]
    assert "nothing close enough" in memo_steps[0]


async def test_pinned_and_changed_requests_are_not_remembered():
    async with chain() as gw:
        await gw.chat(LARGE)
        pinned = await gw.chat(LARGE, model="small")
        other = await gw.chat(LARGE + " Use induction.")
        budget = await gw.chat(LARGE, max_tokens=400)  # the same route text and prompt: the same decision
    assert pinned.ctx.route_trace == ["model_tiers: pinned small"]
    assert embedded(other) and not any(s.startswith("route_memo:") for s in other.ctx.route_trace)
    assert not embedded(budget)


async def test_decisions_are_remembered_per_tenant():
    async with chain() as gw:
        a1 = await gw.chat(LARGE, headers={"x-test-tenant": "A"})
        b1 = await gw.chat(LARGE, headers={"x-test-tenant": "B"})
        a2 = await gw.chat(LARGE, headers={"x-test-tenant": "A"})
        b2 = await gw.chat(LARGE, headers={"x-test-tenant": "B"})
    assert embedded(a1) and embedded(b1)  # B's first request is not served by A's decision
    assert not embedded(a2) and not embedded(b2)
    assert tier(a1) == tier(b1) == tier(a2) == tier(b2) == "large"


async def test_the_candidates_are_part_of_the_key_and_adjusters_still_run():
    rules = {"rules": [{"name": "no_large_for_free", "when": {"tenants": ["free"]}, "deny": ["large"]}]}
    async with chain(("route_rules", rules)) as gw:
        await gw.chat(LARGE, headers={"x-test-tenant": "free"})
        free = await gw.chat(LARGE, headers={"x-test-tenant": "free"})
        await gw.chat(LARGE, headers={"x-test-tenant": "paid"})
        paid = await gw.chat(LARGE, headers={"x-test-tenant": "paid"})
    assert (tier(free), tier(paid)) == ("medium", "large")
    assert not embedded(free) and not embedded(paid)
    config = config_with(("semantic_routes", {"routes": ROUTES, "threshold": 0.4}), "budget_downgrade")
    async with GatewayHarness(RequestFacts, config=config) as gw:
        await gw.chat(LARGE)
        over = await gw.chat(LARGE, headers={"x-test-over-soft-budget": "1"})
    assert not embedded(over) and tier(over) == "medium"  # remembered large, then downgraded as always


async def test_a_new_configuration_starts_with_an_empty_memo():
    async with chain() as gw:
        assert tier(await gw.chat(LARGE)) == "large"
    moved = {"small": ROUTES["small"], "medium": ROUTES["large"], "large": ROUTES["medium"]}
    async with chain(routes_settings={"routes": moved}) as gw:  # the examples moved: so does the prompt
        r = await gw.chat(LARGE)
    assert tier(r) == "medium" and embedded(r)


async def test_memo_entries_zero_turns_it_off():
    async with chain(routes_settings={"memo_entries": 0}, learned={"memo_entries": 0}) as gw:
        await gw.chat(LARGE)
        again = await gw.chat(LARGE)
    assert embedded(again) and not any(s.startswith("route_memo:") for s in again.ctx.route_trace)


async def test_an_auto_exact_cache_hit_needs_no_embedding():
    config = config_with(("semantic_routes", {"routes": ROUTES, "threshold": 0.4}), "learned_router")
    config = config.model_copy(update={"plugins": [*config.plugins, *config_with("exact_cache").plugins[:1]]})
    async with GatewayHarness(RequestFacts, config=config) as gw:
        first = await gw.chat(LARGE, temperature=0)
        hit = await gw.chat(LARGE, temperature=0)
        no_cache = await gw.chat(LARGE, temperature=0, headers={"cache-control": "no-cache"})
    assert first.headers.get("x-extproc-cache") == "miss" and hit.headers.get("x-extproc-cache") == "hit"
    assert hit.replied and not embedded(hit) and hit.ctx.tier == "large"
    assert not no_cache.replied and not embedded(no_cache)  # cache-control still applies: routed from memory, sent on


def test_the_memo_is_a_bounded_lru():
    memo = RouteMemo("semantic_routes", max_entries=2)
    ctx = RequestContext(request_id="r", method="POST", path="/v1/chat/completions", headers={})
    keys = [memo.key(ctx, text, ["small", "large"]) for text in ("one", "two", "three")]
    memo.remember(keys[0], TierChoice("small", "semantic_routes"), "small")
    memo.remember(keys[1], None, "pass")
    assert memo.recall(ctx, keys[0])[0]  # one is now the most recent: two goes first
    memo.remember(keys[2], TierChoice("large", "semantic_routes"), "large")
    assert len(memo) == 2
    assert memo.recall(ctx, keys[1]) == (False, None)
    found, choice = memo.recall(ctx, keys[2])
    assert found and (choice.tier, choice.reason) == ("large", "semantic_routes")
    assert memo.recall(ctx, keys[2])[1] is not choice  # a fresh TierChoice: adjusters change it in place
    assert memo.key(ctx, "one", ["small"]) != keys[0]  # other candidates, another key
    assert RouteMemo("x", max_entries=0).key(ctx, "one", ["small"]) is None
