"""The budgets policy: atomic admission, reconcile to real usage, release, 429s, soft limit, failures."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from extproc_plugins.budgets.ledger import BudgetLedger, Limits, Subject, window_bounds
from extproc.state.memory import MemoryStore
from extproc_plugins.budgets.reservations.memory import MemoryReservations
from extproc.state.store import StoreUnavailable
from extproc.framework.testing import GatewayHarness

from .budget_helpers import config_with

# The fake Triton answer: 5 prompt tokens, one completion token per word.
ANSWER = "one two three"


def budgets(workers: int = 1, **settings):
    return config_with({"name": "budgets", "settings": settings}, workers=workers)


async def report(gw, scope="tenant", subject="anonymous"):
    """The subject's rows once the settlements queued so far reached the store (they are sent in
    the background, after the answer)."""
    plugin = gw.gateway.hooks.pm.get_plugin("budgets")
    await asyncio.wait_for(plugin.settled(), timeout=5)
    ledger = plugin.ledger
    rows = (await ledger.report(Subject(scope, subject)))["windows"]
    return {(r["metric"], r["window"]): r for r in rows}


async def test_reconcile_records_the_real_usage():
    async with GatewayHarness(config=budgets(tenants={"anonymous": {"tokens_per_day": 10_000}})) as gw:
        result = await gw.chat("hello there", max_tokens=50, answer=ANSWER)
        assert result.status == 200
        rows = await report(gw)
    usage = result.json()["usage"]
    assert rows[("tokens", "day")]["spent"] == usage["total_tokens"] == 8
    assert rows[("tokens", "day")]["reserved"] == 0
    assert rows[("tokens", "day")]["remaining"] == 10_000 - 8
    assert rows[("requests", "day")]["spent"] == 1
    # USD in nano-dollars, from the tier's price (small: 0.0001 / 0.0002 per 1K)
    assert rows[("usd", "day")]["spent"] == round((5 * 0.0001 + 3 * 0.0002) / 1000 * 1e9)
    assert result.headers["x-extproc-budget"] == "ok"


async def test_over_budget_is_429_naming_the_budget_with_retry_after():
    async with GatewayHarness(config=budgets(tenants={"anonymous": {"tokens_per_day": 100}})) as gw:
        refused = await gw.chat("hello", max_tokens=200)
    assert refused.status == 429 and refused.replied
    err = refused.json()["error"]
    assert err["code"] == "budget_exceeded" and err["type"] == "insufficient_quota"
    assert "tenant 'anonymous': tokens per day" in err["message"] and "limit 100" in err["message"]
    assert "larger than the limit" in err["message"]
    _, _, end = window_bounds("day", time.time())
    assert 0 < int(refused.headers["retry-after"]) <= end - time.time() + 1
    assert refused.headers["x-extproc-budget"] == "tenant 'anonymous': tokens per day"
    assert refused.ctx.budget_status.startswith("rejected:")


async def test_rate_limit_per_minute_is_rate_limit_exceeded():
    async with GatewayHarness(config=budgets(defaults={"tenant": {"requests_per_minute": 2}})) as gw:
        statuses = [(await gw.chat("hi")).status for _ in range(3)]
        refused = await gw.chat("hi")
    assert statuses == [200, 200, 429]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60


async def test_worst_case_is_reserved_while_in_flight():
    """Two requests that each fit alone, but not together in flight: the second is refused."""
    async with GatewayHarness(config=budgets(tenants={"anonymous": {"tokens_per_day": 150}})) as gw:
        life = gw.gateway.new_stream()
        body = json.dumps({"model": "auto", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]}).encode()
        await life.request_headers({":method": "POST", ":path": "/v1/chat/completions"}, False)
        decision = await life.request_body(body, True)
        assert not hasattr(decision, "status")  # admitted, now in flight holding ~108 tokens
        rows = await report(gw)
        assert rows[("tokens", "day")]["reserved"] > 100
        second = await gw.chat("x", max_tokens=100)
        assert second.status == 429
        await life.stream_closed(True)  # the first one is aborted after it went upstream: its prompt is
        rows = await report(gw)        # charged (on_abort: charge_delivered), the rest comes back
        prompt = life.ctx.prompt_tokens_estimate
        assert rows[("tokens", "day")]["reserved"] == 0 and rows[("tokens", "day")]["spent"] == prompt
        assert rows[("requests", "day")]["spent"] == 1
        assert (await gw.chat("x", max_tokens=100)).status == 200


async def test_aborted_stream_releases_everything_with_on_abort_release():
    cfg = budgets(on_abort="release", tenants={"anonymous": {"tokens_per_day": 1000}})
    async with GatewayHarness(config=cfg) as gw:
        result = await gw.chat("hi", stream=True, answer=ANSWER, abort_after_chunks=1)
        assert result.ctx.outcome == "aborted"
        rows = await report(gw)
    assert rows[("tokens", "day")]["spent"] == 0 and rows[("tokens", "day")]["reserved"] == 0
    assert rows[("requests", "day")]["spent"] == 0


async def test_aborted_stream_charged_what_was_delivered_by_default():
    async with GatewayHarness(config=budgets(tenants={"anonymous": {"tokens_per_day": 1000}})) as gw:
        result = await gw.chat("hi", stream=True, answer=ANSWER, abort_after_chunks=2)
        rows = await report(gw)
    delivered = 2  # "one", " two"
    assert rows[("tokens", "day")]["spent"] == result.ctx.prompt_tokens_estimate + delivered
    assert rows[("tokens", "day")]["reserved"] == 0
    assert rows[("requests", "day")]["spent"] == 1  # hanging up does not dodge requests_per_day


async def test_prompt_is_reserved_as_the_upstream_counts_it():
    # The tier's chat template is part of what Triton counts (and bills): "Hello, how are you
    # today?" is 7 tokens of text, 14 the cookbook way, more with chatml's markers.
    from extproc.formats import tokens
    from extproc.formats.chat_templates import render
    from extproc.formats.openai import ChatMessage

    async with GatewayHarness(config=budgets(tenants={"anonymous": {"tokens_per_day": 10_000}})) as gw:
        result = await gw.chat("Hello, how are you today?", max_tokens=10, answer=ANSWER)
    templated = tokens.count_text(render("chatml", [ChatMessage(role="user", content="Hello, how are you today?")]))
    assert templated > tokens.count_chat([ChatMessage(role="user", content="Hello, how are you today?")])
    assert result.ctx.prompt_tokens_estimate == templated


async def test_upstream_failure_releases():
    async with GatewayHarness(config=budgets(tenants={"anonymous": {"tokens_per_day": 1000}})) as gw:
        result = await gw.chat("hi", upstream_status=500, upstream_chunks=[b'{"error": "boom"}'])
        assert result.ctx.outcome == "failed"
        rows = await report(gw)
    assert rows[("tokens", "day")]["spent"] == 0 and rows[("tokens", "day")]["reserved"] == 0


async def test_soft_threshold_marks_the_request():
    cfg = budgets(soft_threshold=0.5, tenants={"anonymous": {"tokens_per_day": 120}})
    async with GatewayHarness(config=cfg) as gw:
        first = await gw.chat("hi", max_tokens=10, answer=ANSWER)
        assert not first.ctx.over_soft_budget and first.headers["x-extproc-budget"] == "ok"
        second = await gw.chat("hi", max_tokens=60, answer=ANSWER)
    assert second.status == 200 and second.ctx.over_soft_budget
    assert second.headers["x-extproc-budget"] == "soft_limit" and second.ctx.budget_status == "soft_limit"


async def test_scopes_tenant_workflow_and_key_all_apply():
    ledger = BudgetLedger(MemoryStore(), configured={("workflow", "acme/bulk"): Limits(requests_per_day=1)},
                          defaults={"api_key": Limits(requests_per_day=5)})
    subjects = [Subject("tenant", "acme"), Subject("workflow", "acme/bulk"), Subject("api_key", "k1")]
    assert (await ledger.reserve("r1", subjects, {"requests": 1}, ttl=60)).ok
    second = await ledger.reserve("r2", subjects, {"requests": 1}, ttl=60)
    assert not second.ok and second.refused.describe() == "workflow 'acme/bulk': requests per day"
    other = [Subject("tenant", "acme"), Subject("workflow", "acme/chat"), Subject("api_key", "k1")]
    assert (await ledger.reserve("r3", other, {"requests": 1}, ttl=60)).ok


async def test_admin_override_wins_over_configuration():
    store = MemoryStore()
    ledger = BudgetLedger(store, configured={("tenant", "acme"): Limits(tokens_per_day=10)}, settings_ttl=0)
    s = Subject("tenant", "acme")
    assert not (await ledger.reserve("r1", [s], {"tokens": 20}, ttl=60)).ok
    await ledger.set_limits(s, Limits(tokens_per_day=100))
    assert (await ledger.reserve("r2", [s], {"tokens": 20}, ttl=60)).ok
    await ledger.set_limits(s, None)
    assert (await ledger.limits_for(s)).tokens_per_day == 10


def test_windows_are_utc_calendar_aligned():
    t = 1_709_251_199.5  # 2024-02-29 23:59:59.5 UTC
    assert window_bounds("minute", t)[2] == 1_709_251_200
    assert window_bounds("day", t)[2] == 1_709_251_200
    bucket, start, end = window_bounds("month", t)
    assert bucket == "202402" and start == 1_706_745_600 and end == 1_709_251_200


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_200_concurrent_admissions_against_50(backend, request):
    """No check-then-increment race: 200 concurrent requests, a budget that admits 50."""
    cfg = budgets(tenants={"anonymous": {"requests_per_day": 50}})
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        cfg = cfg.model_copy(update={"state": cfg.state.model_copy(
            update={"redis_url": url, "key_prefix": f"u{uuid.uuid4().hex[:8]}:"})})
    async with GatewayHarness(config=cfg) as gw:
        results = await asyncio.gather(*[gw.chat("hi", answer="a") for _ in range(200)])
        rows = await report(gw)
    statuses = [r.status for r in results]
    assert statuses.count(200) == 50 and statuses.count(429) == 150
    assert rows[("requests", "day")]["spent"] == 50 and rows[("requests", "day")]["reserved"] == 0


class FlakyReservations(MemoryReservations):
    """Memory reservations that can be switched off, like a Redis that went away."""

    down = False

    async def reserve(self, *args, **kwargs):
        if self.down:
            raise StoreUnavailable("down")
        return await super().reserve(*args, **kwargs)

    async def reserve_plan(self, *args, **kwargs):
        if self.down:
            raise StoreUnavailable("down")
        return await super().reserve_plan(*args, **kwargs)

    async def commit(self, *args, **kwargs):
        if self.down:
            raise StoreUnavailable("down")
        return await super().commit(*args, **kwargs)

    async def commit_metrics(self, *args, **kwargs):
        if self.down:
            raise StoreUnavailable("down")
        return await super().commit_metrics(*args, **kwargs)

    async def release(self, *args, **kwargs):
        if self.down:
            raise StoreUnavailable("down")
        return await super().release(*args, **kwargs)


def _use(gw, reservations: MemoryReservations) -> None:
    """Give the budgets plugin's ledger these reservations (on a store of their own)."""
    ledger = gw.gateway.hooks.pm.get_plugin("budgets").ledger
    ledger.store, ledger.reservations = reservations.store, reservations


def _flaky(gw) -> FlakyReservations:
    flaky = FlakyReservations(MemoryStore())
    _use(gw, flaky)
    return flaky


async def test_store_down_at_admission_rejects_by_default():
    async with GatewayHarness(config=budgets(tenants={"anonymous": {"tokens_per_day": 1000}})) as gw:
        _flaky(gw).down = True
        result = await gw.chat("hi")
    assert result.status == 503 and result.headers["retry-after"] == "1"
    assert result.json()["error"]["code"] == "budget_unavailable"


async def test_store_down_at_admission_may_admit_flagged():
    cfg = budgets(on_store_unavailable="admit", tenants={"anonymous": {"tokens_per_day": 1000}})
    async with GatewayHarness(config=cfg) as gw:
        _flaky(gw).down = True
        result = await gw.chat("hi")
    assert result.status == 200 and result.headers["x-extproc-degraded"] == "budgets"
    assert result.ctx.budget_status == "unavailable"


async def test_a_store_outage_is_logged_once_not_per_request(caplog):
    """Redis gone under load used to log one warning per refused request (276 lines in 10 s)."""
    async with GatewayHarness(config=budgets(tenants={"anonymous": {"tokens_per_day": 100000}})) as gw:
        flaky = _flaky(gw)
        flaky.down = True
        with caplog.at_level("WARNING", logger="extproc_plugins.budgets.budgets"):
            statuses = [(await gw.chat(f"hi {i}")).status for i in range(30)]
            flaky.down = False
            statuses += [(await gw.chat(f"back {i}")).status for i in range(5)]
    assert statuses == [503] * 30 + [200] * 5
    lines = [r.getMessage() for r in caplog.records if r.name == "extproc_plugins.budgets.budgets"]
    assert len(lines) == 2, lines
    assert "store unavailable" in lines[0] and "logged once" in lines[0]
    assert "store back" in lines[1] and "30 request(s) were refused with 503" in lines[1]


async def test_settlement_retried_when_the_store_comes_back():
    async with GatewayHarness(config=budgets(tenants={"anonymous": {"tokens_per_day": 1000}})) as gw:
        store = _flaky(gw)
        ledger = gw.gateway.hooks.pm.get_plugin("budgets").ledger

        async def tokens_day():
            rows = (await ledger.report(Subject("tenant", "anonymous")))["windows"]
            return next(r for r in rows if (r["metric"], r["window"]) == ("tokens", "day"))

        # admitted while up, completes while down
        plugin = gw.gateway.hooks.pm.get_plugin("budgets")
        original = plugin._settle

        async def down_then_settle(state, actual):
            store.down = True
            await original(state, actual)

        plugin._settle = down_then_settle
        life_result = await gw.chat("hi", answer=ANSWER)
        await asyncio.wait_for(plugin.settled(), timeout=5)
        assert life_result.status == 200 and len(plugin.pending.queue) == 1
        row = await tokens_day()
        assert row["reserved"] > 0  # not settled yet: the worst case is held
        store.down = False
        await asyncio.sleep(0.8)  # the background retry runs every 0.5 s
        row = await tokens_day()
    assert not plugin.pending.queue
    assert row["metric"] == "tokens" and row["reserved"] == 0 and row["spent"] == 8


async def test_plugin_raising_follows_on_error():
    class Boom(Exception):
        pass

    async def explode(*args, **kwargs):
        raise Boom("ledger bug")

    for on_error, status in (("fail_closed", 500), ("fail_open", 200)):
        cfg = config_with({"name": "budgets", "on_error": on_error,
                           "settings": {"tenants": {"anonymous": {"tokens_per_day": 10}}}})
        async with GatewayHarness(config=cfg) as gw:
            gw.gateway.hooks.pm.get_plugin("budgets").ledger.reserve = explode
            result = await gw.chat("hi")
        assert result.status == status
        if on_error == "fail_closed":
            assert result.json()["error"]["code"] == "plugin_error"
        else:
            assert result.headers["x-extproc-degraded"] == "budgets"


async def test_memory_store_with_several_workers_refuses_to_start():
    with pytest.raises(Exception, match="per worker process"):
        async with GatewayHarness(config=budgets(workers=2)):
            pass
    async with GatewayHarness(config=budgets(workers=2, per_worker_limits=True)) as gw:
        assert (await gw.chat("hi")).status == 200


async def test_dearer_tier_chosen_by_routing_reserves_the_difference():
    from extproc import hookimpl

    class Upgrade:
        @hookimpl
        def extproc_choose_tier(self, ctx, candidates):
            return "large"

    cfg = budgets(tenants={"anonymous": {"usd_per_day": 0.0001}})
    async with GatewayHarness(Upgrade, config=cfg) as gw:
        # small's worst case fits 0.0001 USD; large's (0.006 per 1K completion) does not.
        result = await gw.chat("hi", max_tokens=64)
    assert result.status == 429 and "usd per day" in result.json()["error"]["message"]


async def test_admission_cancelled_mid_call_releases_what_it_may_have_reserved():
    async with GatewayHarness(config=budgets(tenants={"anonymous": {"tokens_per_day": 1000}})) as gw:
        plugin = gw.gateway.hooks.pm.get_plugin("budgets")
        ledger = plugin.ledger
        original = ledger.reserve
        started = asyncio.Event()

        async def slow_reserve(*args, **kwargs):
            result = await original(*args, **kwargs)  # the reservation is made...
            started.set()
            await asyncio.sleep(10)  # ...but the answer is late, and the stream goes away
            return result

        ledger.reserve = slow_reserve
        task = asyncio.create_task(gw.chat("hi"))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        rows = await report(gw)
    assert rows[("tokens", "day")]["reserved"] == 0 and rows[("tokens", "day")]["spent"] == 0


def test_pending_settlements_are_bounded():
    from extproc_plugins.budgets.budgets import _Pending

    pending = _Pending(maxlen=3)
    for i in range(5):
        pending.add(i)
    assert list(pending.queue) == [2, 3, 4] and pending.dropped == 2


async def test_override_cache_is_bounded():
    ledger = BudgetLedger(MemoryStore(), cache_size=10)
    for i in range(25):
        await ledger.limits_for(Subject("tenant", f"t{i}"))
    assert len(ledger._cache) <= 10


class SlowCommitReservations(MemoryReservations):
    """Memory reservations whose settlements wait for ``gate`` (a store that is slow to write)."""

    def __init__(self):
        super().__init__(MemoryStore())
        self.gate = asyncio.Event()
        self.commits = 0

    async def commit_metrics(self, *args, **kwargs):
        await self.gate.wait()
        self.commits += 1
        return await super().commit_metrics(*args, **kwargs)


def _slow(gw) -> SlowCommitReservations:
    slow = SlowCommitReservations()  # not on the gateway's store: survives stop()
    _use(gw, slow)
    return slow


async def _tokens_day(reservations: MemoryReservations) -> dict:
    ledger = BudgetLedger(reservations.store)
    ledger.reservations = reservations
    rows = (await ledger.report(Subject("tenant", "anonymous")))["windows"]
    return next(r for r in rows if (r["metric"], r["window"]) == ("tokens", "day"))


async def test_reconcile_is_off_the_response_path():
    """The answer goes out while the store is still being written; the spend lands after."""
    async with GatewayHarness(config=budgets(tenants={"anonymous": {"tokens_per_day": 1000}})) as gw:
        store = _slow(gw)
        result = await asyncio.wait_for(gw.chat("hi", answer=ANSWER), timeout=2)  # not held by the store
        assert result.status == 200 and store.commits == 0
        assert (await _tokens_day(store))["reserved"] > 0  # the worst case is held meanwhile
        store.gate.set()
        await asyncio.wait_for(gw.gateway.hooks.pm.get_plugin("budgets").settled(), timeout=2)
        row = await _tokens_day(store)
    assert row["reserved"] == 0 and row["spent"] == 8


async def test_full_settle_queue_makes_the_request_wait_never_drops():
    cfg = budgets(settle_queue_size=1, tenants={"anonymous": {"tokens_per_day": 10_000}})
    async with GatewayHarness(config=cfg) as gw:
        store = _slow(gw)
        first = await gw.chat("hi", answer=ANSWER)  # queued
        second = asyncio.create_task(gw.chat("hi", answer=ANSWER))  # the queue is full: waits
        await asyncio.sleep(0.1)
        assert first.status == 200 and not second.done()
        store.gate.set()
        assert (await asyncio.wait_for(second, timeout=2)).status == 200
        await gw.gateway.hooks.pm.get_plugin("budgets").settled()
        row = await _tokens_day(store)
    assert store.commits == 2 and row["reserved"] == 0 and row["spent"] == 16


async def test_shutdown_sends_every_queued_settlement():
    async with GatewayHarness(config=budgets(tenants={"anonymous": {"tokens_per_day": 10_000}})) as gw:
        store = _slow(gw)
        for _ in range(3):
            assert (await gw.chat("hi", answer=ANSWER)).status == 200
        assert store.commits == 0
        asyncio.get_running_loop().call_later(0.1, store.gate.set)
    # the harness stopped the gateway (a SIGTERM drain runs the same shutdown hook)
    row = await _tokens_day(store)
    assert store.commits == 3 and row["reserved"] == 0 and row["spent"] == 24
