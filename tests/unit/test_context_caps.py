"""Context caps: reject / drop oldest turns / trim the middle, max_tokens caps, rule matching."""

from __future__ import annotations

import json

import pytest

from extproc.formats import tokens
from extproc.formats.openai import parse_request
from extproc.framework.testing import GatewayHarness

from .budget_helpers import config_with

WORDS = " ".join(f"word{i}" for i in range(4000))  # ~8,000 tokens


def caps(rules, **settings):
    return config_with({"name": "context_caps", "settings": {"rules": rules, **settings}})


def chat(messages, **extra):
    return {"model": "auto", "messages": messages, **extra}


async def test_reject_is_400_context_length_exceeded():
    async with GatewayHarness(config=caps([{"max_prompt_tokens": 500, "strategy": "reject"}])) as gw:
        result = await gw.chat(WORDS)
    assert result.status == 400 and result.replied
    err = result.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert "maximum context length is 500 tokens" in err["message"]
    assert result.upstream_path is None  # nothing went upstream


async def test_drop_oldest_keeps_system_and_last_user():
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(20):
        messages += [{"role": "user", "content": f"question {i} " + WORDS[:2000]},
                     {"role": "assistant", "content": f"answer {i} " + WORDS[:2000]}]
    messages.append({"role": "user", "content": "the last question"})
    async with GatewayHarness(config=caps([{"max_prompt_tokens": 3000, "strategy": "drop_oldest"}])) as gw:
        result = await gw.send(chat(messages))
    assert result.status == 200
    kept = result.ctx.request.messages
    assert kept[0].content == "You are terse." and kept[-1].content == "the last question"
    assert kept[1].role == "user"  # whole turns went: the first kept one starts with a question
    assert "question 19" in kept[-3].text and "answer 19" in kept[-2].text  # the newest turns stayed
    assert tokens.count_chat(kept) <= 3000
    before = tokens.count_chat(parse_request("chat", json.dumps(chat(messages)).encode()).messages)
    assert result.ctx.tokens_cut == before - tokens.count_chat(kept) > 0
    assert result.headers["x-extproc-tokens-cut"] == str(result.ctx.tokens_cut)
    # the upstream got the cut prompt
    assert "question 0 " not in result.upstream_json["text_input"]
    assert "the last question" in result.upstream_json["text_input"]


async def test_drop_oldest_falls_back_to_trimming_one_huge_message():
    async with GatewayHarness(config=caps([{"max_prompt_tokens": 1000, "strategy": "drop_oldest"}])) as gw:
        result = await gw.chat(WORDS)
    assert result.status == 200 and tokens.count_chat(result.ctx.request.messages) <= 1000


async def test_trim_middle_keeps_head_and_tail():
    messages = [{"role": "system", "content": "System prompt."},
                {"role": "user", "content": "START " + WORDS + " END"}]
    async with GatewayHarness(config=caps([{"max_prompt_tokens": 600, "strategy": "trim_middle"}])) as gw:
        result = await gw.send(chat(messages))
    assert result.status == 200
    text = result.ctx.request.messages[1].content
    assert text.startswith("START ") and text.endswith(" END") and "tokens cut ...]" in text
    assert result.ctx.request.messages[0].content == "System prompt."
    after = tokens.count_chat(result.ctx.request.messages)
    assert 550 <= after <= 600 and result.ctx.prompt_tokens_estimate == after


async def test_trim_middle_on_text_parts_and_completions_prompt():
    parts = [{"type": "text", "text": "A " + WORDS}, {"type": "text", "text": "B short"}]
    async with GatewayHarness(config=caps([{"max_prompt_tokens": 400, "strategy": "trim_middle"}])) as gw:
        result = await gw.send(chat([{"role": "user", "content": parts}]))
        assert result.status == 200 and tokens.count_chat(result.ctx.request.messages) <= 400
        assert result.ctx.request.messages[0].content[1]["text"] == "B short"
        comp = await gw.send({"model": "auto", "prompt": WORDS}, path="/v1/completions")
    assert comp.status == 200 and tokens.count_text(comp.ctx.request.prompt) <= 400


async def test_max_tokens_clamped_or_rejected():
    async with GatewayHarness(config=caps([{"max_tokens": 32, "strategy": "trim_middle"}])) as gw:
        result = await gw.chat("hi", max_tokens=500)
    assert result.status == 200 and result.upstream_json["max_tokens"] == 32
    async with GatewayHarness(config=caps([{"max_tokens": 32, "strategy": "reject"}])) as gw:
        refused = await gw.chat("hi", max_tokens=500)
    assert refused.status == 400 and refused.json()["error"]["param"] == "max_tokens"


async def test_first_matching_rule_applies_by_tenant_workflow_tier_and_route():
    rules = [{"tenants": ["acme"], "workflows": ["bulk"], "max_prompt_tokens": 100, "strategy": "reject"},
             {"tiers": ["large"], "max_prompt_tokens": 200, "strategy": "reject"},
             {"routes": ["/v1/completions"], "max_prompt_tokens": 300, "strategy": "reject"}]
    text = " ".join(["hello"] * 250)
    async with GatewayHarness(config=caps(rules)) as gw:
        assert (await gw.chat(text)).status == 200  # small, chat: no rule
        assert (await gw.chat(text, model="large")).status == 400  # the tier rule
        assert (await gw.send({"model": "auto", "prompt": text + text}, path="/v1/completions")).status == 400
        plugin = gw.gateway.hooks.pm.get_plugin("context_caps")
        from extproc.framework.context import RequestContext
        ctx = RequestContext("r", "POST", "/v1/chat/completions", {}, tenant="acme", workflow="bulk")
        assert plugin.settings.rules[0].matches("small", ctx.path, ctx.workflow, ctx.tenant)
        assert not plugin.settings.rules[0].matches("small", ctx.path, "chat", ctx.tenant)


async def test_context_window_fit_and_candidate_narrowing():
    cfg = config_with({"name": "context_caps", "settings": {}},
                      tiers={"small": {"context_window": 600}, "medium": {"context_window": 4096},
                             "large": {"context_window": 8192}})
    text = " ".join(["hello"] * 1000)
    async with GatewayHarness(config=cfg) as gw:
        refused = await gw.chat(text, model="small")  # pinned: the window is a cap (default: reject)
        assert refused.status == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
        routed = await gw.chat(text, model="auto")  # auto: expected tier small -> reject as well
        assert routed.status == 400
        fits = await gw.chat(text, model="medium")
        assert fits.status == 200

        plugin = gw.gateway.hooks.pm.get_plugin("context_caps")
        ctx = fits.ctx
        candidates = ["small", "medium", "large"]
        plugin.extproc_choose_tier(ctx, candidates)
        assert candidates == ["medium", "large"] and "small" in ctx.route_trace[-1]


def test_unknown_tier_in_a_rule_fails_start_up():
    import asyncio

    async def start():
        async with GatewayHarness(config=caps([{"tiers": ["huge"], "max_prompt_tokens": 5}])):
            pass

    with pytest.raises(Exception, match="unknown tier"):
        asyncio.run(start())
