"""One test per hook, named after it, through the real lifecycle (extproc.framework.testing)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from extproc import OpenAIError, Reply, TierChoice, hookimpl
from extproc.framework.hookspecs import HOOK_NAMES
from extproc.framework.testing import GatewayHarness


class Recorder:
    """Records every hook call, in order."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def extproc_startup(self, gateway):
        self.calls.append("startup")

    @hookimpl
    def extproc_shutdown(self, gateway):
        self.calls.append("shutdown")

    @hookimpl
    def extproc_request_headers(self, ctx):
        self.calls.append("request_headers")

    @hookimpl
    def extproc_request_parsed(self, ctx):
        self.calls.append("request_parsed")

    @hookimpl
    def extproc_choose_tier(self, ctx, candidates):
        self.calls.append("choose_tier")

    @hookimpl
    def extproc_before_upstream(self, ctx, upstream):
        self.calls.append("before_upstream")

    @hookimpl
    def extproc_response_chunk(self, ctx, chunk):
        self.calls.append("response_chunk")

    @hookimpl
    async def extproc_response_complete(self, ctx):
        self.calls.append("response_complete")

    @hookimpl
    def extproc_request_finished(self, ctx):
        self.calls.append(f"request_finished:{ctx.outcome}")


def test_every_hook_is_documented_and_tested():
    import extproc.framework.hookspecs as specs

    for name in HOOK_NAMES:
        doc = getattr(specs, name).__doc__
        assert doc and ":param ctx:" in doc or ":param gateway:" in doc, name
        assert f"test_{name}" in globals(), f"no test named after {name}"


async def test_hooks_run_in_lifecycle_order():
    rec = Recorder()
    async with GatewayHarness(rec) as gw:
        await gw.chat("hello", stream=True)
    assert rec.calls[0] == "startup" and rec.calls[-1] == "shutdown"
    order = [c for c in rec.calls if c not in ("startup", "shutdown")]
    assert order[:4] == ["request_headers", "request_parsed", "choose_tier", "before_upstream"]
    assert "response_chunk" in order
    assert order[-2:] == ["response_complete", "request_finished:completed"]


async def test_extproc_startup():
    rec = Recorder()
    async with GatewayHarness(rec):
        assert rec.calls == ["startup"]


async def test_extproc_shutdown():
    rec = Recorder()
    async with GatewayHarness(rec):
        pass
    assert rec.calls == ["startup", "shutdown"]


async def test_extproc_request_headers():
    class NeedsKey:
        @hookimpl
        def extproc_request_headers(self, ctx):
            if "authorization" not in ctx.headers:
                raise OpenAIError(401, "Missing API key.", type="invalid_request_error", code="invalid_api_key")

    async with GatewayHarness(NeedsKey) as gw:
        refused = await gw.chat("hi")
        allowed = await gw.send({"model": "auto", "messages": [{"role": "user", "content": "x"}]},
                                headers={"authorization": "Bearer k"})
    assert refused.status == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert refused.ctx.outcome == "replied"
    assert allowed.status == 200


async def test_extproc_request_parsed():
    class Cache:
        @hookimpl
        def extproc_request_parsed(self, ctx):
            if ctx.request.messages[-1].text == "cached?":
                return Reply.json(200, {"cached": True}, headers=[("x-cache", "hit")])
            ctx.request.max_tokens = 7  # policies may rewrite the request

    async with GatewayHarness(Cache) as gw:
        hit = await gw.chat("cached?")
        miss = await gw.chat("fresh")
    assert hit.replied and hit.json() == {"cached": True} and hit.headers["x-cache"] == "hit"
    assert miss.upstream_json["max_tokens"] == 7


async def test_extproc_choose_tier():
    class LongToLarge:
        @hookimpl
        def extproc_choose_tier(self, ctx, candidates):
            candidates.remove("medium")  # narrowing is visible to later plugins
            if len(ctx.request.messages[-1].text) > 20:
                return TierChoice("large", "long prompt")

    async with GatewayHarness(LongToLarge) as gw:
        long = await gw.chat("x" * 50)
        short = await gw.chat("short")
        pinned_forbidden = await gw.chat("short", model="medium")
    assert long.upstream_headers["x-extproc-tier"] == "large"
    assert long.headers["x-extproc-tier-reason"] == "long prompt"
    assert long.upstream_path == "/v2/models/llm-large/generate_stream"
    assert short.upstream_headers["x-extproc-tier"] == "small"  # model_tiers: auto -> default
    assert pinned_forbidden.status == 403
    assert pinned_forbidden.json()["error"]["code"] == "model_not_allowed"


async def test_extproc_adjust_tier():
    class OneDown:
        """Moves whatever was chosen one tier down; sees the choice as the previous plugin left it."""

        seen = []

        @hookimpl
        def extproc_adjust_tier(self, ctx, choice, candidates):
            self.seen.append((choice.tier, list(candidates), ctx.tier))
            if choice.tier == "large":
                choice.tier, choice.reason = "medium", "one down"

    async with GatewayHarness(OneDown) as gw:
        moved = await gw.chat("hi", model="large")
        kept = await gw.chat("hi", model="small")
    assert OneDown.seen[0] == ("large", ["small", "medium", "large"], None)  # before ctx.tier is set
    assert moved.upstream_headers["x-extproc-tier"] == "medium"
    assert moved.upstream_path == "/v2/models/llm-medium/generate_stream"
    assert moved.headers["x-extproc-tier-reason"] == "one down"
    assert kept.upstream_headers["x-extproc-tier"] == "small"
    assert kept.headers["x-extproc-tier-reason"] == "pinned"


async def test_extproc_before_upstream():
    class Tag:
        @hookimpl
        def extproc_before_upstream(self, ctx, upstream):
            upstream.headers["x-extproc-internal"] = "tagged"
            if b"forbidden" in upstream.body:
                return Reply.json(451, {"error": {"message": "no", "type": "policy", "param": None, "code": None}})

    async with GatewayHarness(Tag) as gw:
        ok = await gw.chat("fine")
        refused = await gw.chat("forbidden words")
    assert ok.upstream_headers["x-extproc-internal"] == "tagged"
    assert refused.status == 451


async def test_extproc_response_chunk():
    seen = []

    class Watch:
        @hookimpl
        def extproc_response_chunk(self, ctx, chunk):
            seen.append(chunk.text)

    async with GatewayHarness(Watch) as gw:
        await gw.chat("hi", stream=True, answer="one two three")
    assert "".join(seen) == "one two three"
    assert len([s for s in seen if s]) == 3


async def test_extproc_response_complete():
    done = []

    class Usage:
        @hookimpl
        def extproc_response_complete(self, ctx):
            done.append((ctx.usage.prompt_tokens, ctx.usage.completion_tokens, ctx.cost_usd))

    async with GatewayHarness(Usage) as gw:
        await gw.chat("hi", answer="a b c d")
    prompt, completion, cost = done[0]
    assert (prompt, completion) == (5, 4)
    assert cost == pytest.approx((5 * 0.0001 + 4 * 0.0002) / 1000)


async def test_extproc_request_finished():
    outcomes = []

    class Finish:
        @hookimpl
        def extproc_request_finished(self, ctx):
            outcomes.append(ctx.outcome)

    async with GatewayHarness(Finish) as gw:
        await gw.chat("hi")
        await gw.send(b"not json")
        await gw.chat("hi", stream=True, answer="a b c", abort_after_chunks=1)
        await gw.chat("hi", upstream_status=500, upstream_chunks=[b'{"error": "boom"}'])
    assert outcomes == ["completed", "replied", "aborted", "failed"]


class _Named:
    """A plugin whose settings the harness must pass on (for the settings tests below)."""

    class Settings(BaseModel):
        word: str

    def __init__(self, settings):
        self.word = settings.word


class First(_Named):
    pass


class Second(_Named):
    pass


def _plugin(harness, cls):
    return next(p.obj for p in harness.gateway.hooks.plugins if isinstance(p.obj, cls))


def test_harness_gives_every_plugin_its_settings():
    one = GatewayHarness(First, settings={"word": "alone"})
    assert _plugin(one, First).word == "alone"
    both = GatewayHarness(First, Second, settings={"First": {"word": "a"}, "Second": {"word": "b"}})
    assert (_plugin(both, First).word, _plugin(both, Second).word) == ("a", "b")


def test_harness_refuses_flat_settings_for_several_plugins():
    with pytest.raises(ValueError, match="maps each plugin's name to its settings"):
        GatewayHarness(First, Second, settings={"word": "which one?"})
