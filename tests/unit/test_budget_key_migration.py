"""An earlier version's budget keys (no hash tag) moved to today's names, on a real redis-server."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from extproc.commands.cli import main
from extproc_plugins.budgets.key_migration import migrate_legacy_keys
from extproc_plugins.budgets.ledger import counter_key, settings_key, subjects_of


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def prefix():
    return f"mig{uuid.uuid4().hex[:8]}:"


def _new(subject, metric="tokens", window="month", bucket="202612"):
    return counter_key(subject.scope, subject.id, metric, window, bucket, subject.tag)


def test_spend_and_limits_move_under_the_tenants_tag(client, prefix):
    tenant, workflow, api_key = subjects_of("acme corp", "notes", "k1")  # what a request is charged to
    client.set(f"{prefix}bud:tenant:acme%20corp:tokens:month:202612", 1200, px=3_600_000)
    client.set(f"{prefix}bud:tenant:acme%20corp:tokens:month:202612:held", 200, px=3_600_000)
    client.set(f"{prefix}bud:workflow:acme%20corp%2Fnotes:tokens:month:202612", 700)
    client.set(f"{prefix}bud:api_key:k1:tokens:month:202612", 300)
    client.set(f"{prefix}apikey:id:k1", b"d1")  # a key created through the admin API
    client.set(f"{prefix}apikey:h:d1", json.dumps({"id": "k1", "tenant": "acme corp"}))
    client.set(f"{prefix}budgetcfg:tenant:acme%20corp", b'{"tokens_per_month":5000}')

    report = migrate_legacy_keys(client, prefix=prefix)

    assert (report.counters, report.spend_moved, report.settings) == (3, 1000 + 700 + 300, 1)
    assert int(client.get(prefix + _new(tenant))) == 1000  # spend only: what was held goes with its reservation
    assert 0 < client.pttl(prefix + _new(tenant)) <= 3_600_000  # the old expiry kept
    assert int(client.get(prefix + _new(workflow))) == 700
    assert int(client.get(prefix + _new(api_key))) == 300
    assert client.get(prefix + settings_key("tenant", "acme corp", tenant.tag)) == b'{"tokens_per_month":5000}'
    assert not list(client.scan_iter(match=f"{prefix}bud:tenant:*"))  # the old names are gone
    assert not list(client.scan_iter(match=f"{prefix}budgetcfg:tenant:*"))
    # twice is once
    again = migrate_legacy_keys(client, prefix=prefix)
    assert (again.counters, again.settings) == (0, 0)
    assert int(client.get(prefix + _new(tenant))) == 1000


def test_spend_already_charged_under_the_new_name_is_added_to_and_new_limits_win(client, prefix):
    (tenant,) = subjects_of("t", None, None)
    client.set(prefix + _new(tenant), 50)  # an upgraded gateway charged this already
    client.set(f"{prefix}bud:tenant:t:tokens:month:202612", 400)
    client.set(prefix + settings_key("tenant", "t", tenant.tag), b'{"tokens_per_month":1}')
    client.set(f"{prefix}budgetcfg:tenant:t", b'{"tokens_per_month":999}')
    report = migrate_legacy_keys(client, prefix=prefix)
    assert int(client.get(prefix + _new(tenant))) == 450
    assert (report.settings, report.settings_kept) == (0, 1)
    assert client.get(prefix + settings_key("tenant", "t", tenant.tag)) == b'{"tokens_per_month":1}'


def test_an_api_key_of_unknown_tenant_stays_until_given(client, prefix):
    client.set(f"{prefix}bud:api_key:cfgkey:requests:day:20430", 9)
    report = migrate_legacy_keys(client, prefix=prefix)
    assert report.unresolved_api_keys == {"cfgkey"} and report.counters == 0
    assert client.get(f"{prefix}bud:api_key:cfgkey:requests:day:20430") == b"9"
    assert "--key-tenant" in "\n".join(report.lines())
    report = migrate_legacy_keys(client, prefix=prefix, key_tenants={"cfgkey": "t2"})
    (_, key) = subjects_of("t2", None, "cfgkey")
    assert report.counters == 1 and int(client.get(prefix + _new(key, "requests", "day", "20430"))) == 9


def test_the_command_dry_run_changes_nothing(client, prefix, redis_url, capsys):
    client.set(f"{prefix}bud:tenant:t:usd:day:20430", 3)
    assert main(["budgets", "migrate-keys", "--redis", redis_url, "--prefix", prefix, "--dry-run"]) == 0
    assert "would move 1 counter(s) (3 units of spend)" in capsys.readouterr().out
    assert client.get(f"{prefix}bud:tenant:t:usd:day:20430") == b"3"
    assert main(["budgets", "migrate-keys", "--redis", redis_url, "--prefix", prefix]) == 0
    assert "moved 1 counter(s)" in capsys.readouterr().out
    assert main(["budgets", "migrate-keys", "--redis", "redis+cluster://127.0.0.1:1", "--prefix", prefix]) == 2
