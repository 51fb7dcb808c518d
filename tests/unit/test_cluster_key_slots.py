"""Every multi-key script's keys hash to one Redis Cluster slot; different tenants spread.

Computed with redis-py's own ``key_slot`` (CRC16 of the hash tag, as the server does); the real
cluster run is ``tests/e2e/test_redis_cluster.py``.
"""

from __future__ import annotations

from redis.crc import key_slot

from extproc.state.redis_store import cluster_nodes, hash_tag, is_cluster_url
from extproc_plugins.budgets.ledger import BudgetLedger, Limits, Subject, subjects_of
from extproc_plugins.budgets.reservations.redis_backend import _tagged, _unpack
from extproc_plugins.caching.vector_index import RedisVectorIndex
from extproc.state.memory import MemoryStore

PREFIX = "extproc:"


def slots(keys) -> set[int]:
    return {key_slot((PREFIX + k if not k.startswith(PREFIX) else k).encode()) for k in keys}


def test_a_reservation_touches_one_slot_tenant_workflow_and_key():
    ledger = BudgetLedger(MemoryStore(), defaults={"tenant": Limits(requests_per_day=5),
                                                   "api_key": Limits(tokens_per_minute=100),
                                                   "workflow": Limits(usd_per_hour=1.0)},
                          track={"tenant": ["day", "month"]})
    subjects = tuple(subjects_of("acme corp/{x}", "bulk", "k1"))
    assert {s.tag for s in subjects} == {"acme corp/{x}"}
    plan = ledger._prepared(subjects, 1_700_000_000.0).plan
    tag = hash_tag(PREFIX + plan.keys[0])
    assert tag and "{" not in tag and "}" not in tag  # a tenant's own braces are quoted away
    res = _tagged(PREFIX, tag)
    keys = [*plan.keys, *(k + ":held" for k in plan.keys), *plan.guards, res + "r1", res + "due"]
    assert len(keys) > 10 and len(slots(keys)) == 1
    # the admin API's view of the key (Subject with its tenant) finds the same counters
    report_key = f"bud:{{{tag}}}:api_key:k1:requests:day:1"
    assert slots([report_key]) == slots(plan.keys)


def test_different_tenants_spread_over_the_slots():
    ledger = BudgetLedger(MemoryStore(), track={"tenant": ["day"]})
    seen = {next(iter(slots(ledger._prepared((Subject("tenant", f"t{i}"),), 0.0).plan.keys))) for i in range(60)}
    assert len(seen) > 50
    assert {s * 3 // 16384 for s in seen} == {0, 1, 2}  # each third of the slots: each master of three


def test_a_vector_index_scope_is_one_slot():
    index = RedisVectorIndex.__new__(RedisVectorIndex)
    index.prefix = PREFIX + "vx:"
    keys = index._keys("sc:0123abcd")
    assert len(slots(keys)) == 1 and len(keys) == 3
    other = {next(iter(slots(index._keys(f"sc:{i:08x}")))) for i in range(30)}
    assert len(other) > 25


def test_cluster_urls():
    assert is_cluster_url("redis+cluster://a:1,b:2") and is_cluster_url("rediss+cluster://a:1")
    assert not is_cluster_url("redis://a:1/0") and not is_cluster_url(None)
    assert cluster_nodes("redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7001,h3") == (
        "redis://u:p@10.0.0.1:7000", [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("h3", 6379)])
    assert cluster_nodes("rediss+cluster://h:7000?ssl_cert_reqs=none")[0] == "rediss://h:7000?ssl_cert_reqs=none"


def test_packed_calls_unpack_for_the_cluster_client():
    packed = b"*3\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$0\r\n\r\n"
    assert _unpack(packed) == [b"EVALSHA", b"ab", b""]


def test_a_hash_tag_in_the_prefix_is_refused_on_a_cluster():
    import pytest

    from extproc.state.redis_store import RedisStore

    with pytest.raises(ValueError, match="key_prefix"):
        RedisStore("redis+cluster://127.0.0.1:1", prefix="{all}:")
    assert RedisStore("redis://127.0.0.1:1/0", prefix="{all}:").cluster is False  # one node: any prefix


def test_the_tags_of_unsettled_reservations_are_bounded(monkeypatch):
    import asyncio

    from extproc_plugins.budgets.reservations import redis_backend

    class Store:  # just enough of a RedisStore for the backend's bookkeeping
        prefix, cluster = "p:", True

        def on_close(self, _):
            pass

    backend = redis_backend.RedisReservations(Store())
    monkeypatch.setattr(redis_backend, "MAX_TAGS", 8)

    async def refused_by_the_store(lane, name, packed):
        from extproc.state.store import StoreUnavailable

        raise StoreUnavailable("down")

    backend._call_script = refused_by_the_store
    plan = redis_backend.ReservePlan(keys=["bud:{t}:a"], metrics=[0], limits=[None], expire_at=[0.0])

    async def run():
        for i in range(50):
            try:
                await backend.reserve_plan(f"r{i}", plan, [1], 1.0)
            except Exception:
                pass
        # a reservation this backend does not know is not asked about on a cluster
        assert await backend.release("never-seen") is False

    asyncio.run(run())
    assert 0 < backend.holdings()["reservation_tags"] <= 8 and "r49" in backend._tags
