"""Budget leases: a worker admits from a block it reserved once; never overspends; spend stays exact."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from extproc_plugins.budgets.reservations import reservations_for
from extproc_plugins.budgets.leases import LeaseSettings
from extproc_plugins.budgets.ledger import BudgetLedger, Limits, Subject
from extproc.observability.metrics import get_metrics
from extproc.state.redis_store import RedisStore
from extproc.framework.testing import GatewayHarness

from .budget_helpers import config_with

ACME = [Subject("tenant", "acme")]
REQ = {"requests": 1, "tokens": 100, "usd": 0}


class Counting:
    """Counts the store's reservation calls (one per direct admission or block)."""

    def __init__(self, store):
        self.store = store
        self.calls = 0
        original = reservations_for(store).reserve_plan

        async def reserve_plan(*args, **kwargs):
            self.calls += 1
            return await original(*args, **kwargs)

        reservations_for(store).reserve_plan = reserve_plan


def ledger(store, limits: Limits, **lease) -> BudgetLedger:
    return BudgetLedger(store, configured={("tenant", "acme"): limits},
                        leases=LeaseSettings(enabled="on", **lease))


async def rows(led: BudgetLedger) -> dict:
    report = await led.report(ACME[0])
    return {(r["metric"], r["window"]): r for r in report["windows"]}


async def test_many_admissions_from_few_store_calls_and_spend_stays_exact(store):
    counting = Counting(store)
    led = ledger(store, Limits(tokens_per_day=10_000_000, requests_per_minute=100_000))
    for i in range(200):
        assert (await led.reserve(f"r{i}", ACME, REQ, ttl=60)).ok
    # A first block of 4 requests' worth (min_requests), then blocks of 64 (max_requests) once it
    # ran out: 5 store calls for 200 admissions (6 if the last block ahead was opened already).
    assert counting.calls in (5, 6) and led.leases.local_admissions == 200
    during = await rows(led)
    assert during[("tokens", "day")]["reserved"] >= 200 * 100  # blocks are visible as reserved
    for i in range(200):
        assert await led.commit(f"r{i}", {"requests": 1, "tokens": 37, "usd": 0})
    await led.leases.maintain(final=True)
    after = await rows(led)
    assert after[("tokens", "day")]["spent"] == 200 * 37 and after[("tokens", "day")]["reserved"] == 0
    assert after[("requests", "minute")]["spent"] == 200


async def test_near_a_limit_every_request_is_reserved_on_its_own(store):
    """A block must hold min_requests requests' worth within fraction of the headroom: under a
    limit of 50 requests nothing is leased, so the 50th admission is as exact as without leases."""
    counting = Counting(store)
    led = ledger(store, Limits(requests_per_day=50))
    results = [await led.reserve(f"r{i}", ACME, REQ, ttl=60) for i in range(60)]
    assert [r.ok for r in results].count(True) == 50
    assert led.leases.opened == 0 and counting.calls == 60


async def test_two_workers_leasing_never_overspend(redis_url):
    """Two workers (own connections, own blocks) race 600 admissions at a budget of 200."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    stores = [RedisStore(redis_url, prefix=prefix) for _ in range(2)]
    limits = Limits(tokens_per_minute=20_000)  # 200 requests of 100 tokens; blocks of up to 10
    workers = [ledger(s, limits, fraction=0.1) for s in stores]
    try:
        async def one(w, i):
            return f"{w}-{i}" if (await workers[w].reserve(f"{w}-{i}", ACME, REQ, ttl=60)).ok else None

        admitted = [r for r in await asyncio.gather(*(one(i % 2, i) for i in range(600))) if r]
        assert len(admitted) <= 200
        assert sum(w.leases.opened for w in workers) > 0  # leasing did happen
        for rid in admitted:
            w = workers[int(rid[0])]
            await w.commit(rid, {"requests": 1, "tokens": 60, "usd": 0})
        for w in workers:
            await w.leases.maintain(final=True)
        after = await rows(workers[0])
        assert after[("tokens", "minute")]["spent"] == 60 * len(admitted)
        assert after[("tokens", "minute")]["reserved"] == 0
        # What was given back is admitted again: the budget is not lost to leasing.
        more = [await workers[1].reserve(f"x{i}", ACME, REQ, ttl=60) for i in range(300)]
        assert 60 * len(admitted) + 100 * [m.ok for m in more].count(True) <= 20_000
        assert [m.ok for m in more].count(True) >= (20_000 - 60 * len(admitted)) // 100 - 10
    finally:
        for s in stores:
            await s.close()


async def test_a_block_retires_after_its_seconds_and_gives_back_what_it_did_not_use(store):
    led = ledger(store, Limits(tokens_per_day=10_000_000), seconds=0.05)
    for i in range(3):
        assert (await led.reserve(f"r{i}", ACME, REQ, ttl=60)).ok
    first = led.leases._slices["r0"]
    assert led.leases.opened == 1 and first.block[1] == 4 * 100  # min_requests' worth
    await asyncio.sleep(0.06)
    await led.leases.maintain()  # retired by time; 3 requests in flight keep it
    assert first.retired and not first.closed and led.leases.holding() == 1
    for i in range(5):
        assert (await led.reserve(f"late{i}", ACME, REQ, ttl=60)).ok  # twice the last one's 3: a new block
    assert led.leases.opened == 2
    for i in range(3):
        await led.release(f"r{i}") if i == 2 else await led.commit(f"r{i}", {"tokens": 10})
    assert first.closed  # closed when its last request was settled
    for i in range(5):
        await led.commit(f"late{i}", {"tokens": 10})
    await asyncio.sleep(0.06)
    await led.leases.maintain()
    after = await rows(led)
    assert after[("tokens", "day")]["spent"] == 7 * 10 and after[("tokens", "day")]["reserved"] == 0
    assert led.leases.holding() == 0


async def test_shutdown_charges_requests_still_in_flight_their_worst_case(store):
    led = ledger(store, Limits(tokens_per_day=10_000_000))
    for i in range(4):
        assert (await led.reserve(f"r{i}", ACME, REQ, ttl=60)).ok
    await led.commit("r0", {"tokens": 10})
    await led.commit("r1", {"tokens": 10})
    assert await led.leases.maintain(final=True) == 1
    after = await rows(led)
    assert after[("tokens", "day")]["spent"] == 10 + 10 + 2 * 100  # never under-counted
    assert after[("tokens", "day")]["reserved"] == 0
    assert not await led.commit("r2", {"tokens": 1})  # settling later changes nothing more
    assert (await rows(led))[("tokens", "day")]["spent"] == 220


async def test_an_admin_override_applies_once_the_block_retires(store):
    led = ledger(store, Limits(tokens_per_day=10_000_000), seconds=0.05)
    assert (await led.reserve("a", ACME, REQ, ttl=60)).ok
    assert (await led.reserve("b", ACME, REQ, ttl=60)).ok and led.leases.opened == 1
    await led.set_limits(ACME[0], Limits(tokens_per_day=10))
    await asyncio.sleep(0.06)
    refused = await led.reserve("c", ACME, REQ, ttl=60)
    assert not refused.ok and refused.refused.limit == 10


async def test_soft_threshold_is_seen_through_a_block(store):
    led = ledger(store, Limits(tokens_per_day=100_000), fraction=0.5)
    ratios = [(await led.reserve(f"r{i}", ACME, {"tokens": 1000}, ttl=60)).max_ratio for i in range(85)]
    assert led.leases.opened >= 1
    assert ratios == sorted(ratios) and ratios[-1] == pytest.approx(0.85, abs=0.01)


async def test_leases_are_off_with_the_memory_store_by_default():
    cfg = config_with({"name": "budgets", "settings": {"tenants": {"anonymous": {"tokens_per_day": 10**9}}}})
    async with GatewayHarness(config=cfg) as gw:
        assert gw.gateway.hooks.pm.get_plugin("budgets").ledger.leases is None


async def test_through_the_gateway_with_redis_spend_equals_usage(redis_url):
    cfg = config_with({"name": "budgets", "settings": {"tenants": {"anonymous": {"tokens_per_day": 10**9}}}})
    cfg = cfg.model_copy(update={"state": cfg.state.model_copy(
        update={"redis_url": redis_url, "key_prefix": f"u{uuid.uuid4().hex[:8]}:"})})
    counted = get_metrics().budget_admissions.labels("block")
    before = counted._value.get()
    async with GatewayHarness(config=cfg) as gw:
        plugin = gw.gateway.hooks.pm.get_plugin("budgets")
        assert plugin.ledger.leases is not None  # auto: on with Redis
        results = await asyncio.gather(*[gw.chat("hello there", max_tokens=20, answer="one two three")
                                          for _ in range(40)])
        assert all(r.status == 200 and r.headers["x-extproc-budget"] == "ok" for r in results)
        assert plugin.ledger.leases.local_admissions > 0
        # extproc_budget_admissions_total{source="block"} counts them
        assert counted._value.get() - before == plugin.ledger.leases.local_admissions
        await plugin.settled()
        spent = (await plugin.ledger.report(Subject("tenant", "anonymous")))["windows"]
        tokens_day = next(r for r in spent if r["metric"] == "tokens" and r["window"] == "day")
    assert tokens_day["spent"] == sum(r.json()["usage"]["total_tokens"] for r in results)
    assert tokens_day["reserved"] == 0


async def test_a_block_whose_opening_was_cancelled_is_given_back(store):
    led = ledger(store, Limits(tokens_per_day=10_000_000))
    original = reservations_for(store).reserve_plan
    reached = asyncio.Event()

    async def slow_reserve(*args, **kwargs):
        result = await original(*args, **kwargs)  # the script ran...
        reached.set()
        await asyncio.sleep(10)  # ...and the caller goes away before hearing of it
        return result

    reservations_for(store).reserve_plan = slow_reserve
    task = asyncio.create_task(led.reserve("r0", ACME, REQ, ttl=60))
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await rows(led))[("tokens", "day")]["reserved"] > 0
    reservations_for(store).reserve_plan = original
    await led.leases.maintain()
    assert (await rows(led))[("tokens", "day")]["reserved"] == 0


async def test_concurrent_maintenance_closes_every_block_once(store):
    led = ledger(store, Limits(tokens_per_day=10_000_000), seconds=0.01)
    for round_ in range(5):
        for i in range(3):
            rid = f"r{round_}-{i}"
            assert (await led.reserve(rid, ACME, REQ, ttl=60)).ok
            await led.commit(rid, {"tokens": 5})
        await asyncio.sleep(0.02)
    await asyncio.gather(*(led.leases.maintain() for _ in range(4)))
    after = await rows(led)
    assert after[("tokens", "day")]["spent"] == 15 * 5 and after[("tokens", "day")]["reserved"] == 0
    assert led.leases.holding() == 0


async def test_sparse_traffic_stops_leasing_and_busy_traffic_brings_it_back(store):
    """A block that admitted a single request in its time is not worth its two store calls: the
    next requests are reserved on their own, until min_requests of them come within seconds."""
    counting = Counting(store)
    led = ledger(store, Limits(tokens_per_day=10_000_000), seconds=0.05, min_requests=4)
    assert (await led.reserve("a", ACME, REQ, ttl=60)).ok and led.leases.opened == 1
    await asyncio.sleep(0.3)
    await led.leases.maintain()  # retired by time, having admitted one request (and the one ahead none)
    calls = counting.calls
    for i in range(3):
        assert (await led.reserve(f"s{i}", ACME, REQ, ttl=60)).ok
    assert counting.calls == calls + 3 and led.leases.local_admissions == 1  # each on its own
    assert (await led.reserve("s3", ACME, REQ, ttl=60)).ok  # the 4th within 0.05 s: busy again
    assert (await led.reserve("s4", ACME, REQ, ttl=60)).ok
    assert led.leases.local_admissions == 2


async def test_a_block_that_ran_out_has_its_successor_opened_ahead_of_need(store):
    led = ledger(store, Limits(tokens_per_day=10_000_000), max_requests=8)
    for i in range(9):  # the first block (8 requests' worth) runs out on the 9th
        assert (await led.reserve(f"r{i}", ACME, REQ, ttl=60)).ok
    await asyncio.sleep(0)  # the background opening runs
    await asyncio.gather(*led.leases._tasks)
    assert led.leases.opened >= 3 and ACME_KEY in led.leases._next  # the one after the active one


ACME_KEY = tuple(ACME)


def test_lease_settings_are_validated_naming_the_bad_key():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="min_requests"):
        LeaseSettings(min_requests=10, max_requests=8)
    with pytest.raises(ValidationError, match="seconds"):
        LeaseSettings(seconds=0)
    with pytest.raises(ValidationError, match="unknown"):
        LeaseSettings(unknown=1)
