"""Budget keys of earlier versions moved to today's names (``extproc budgets migrate-keys``).

Before Redis Cluster support, a counter was ``bud:<scope>:<subject>:<metric>:<window>:<bucket>``
(plus ``...:held``, what open reservations hold) and a subject's limits ``budgetcfg:<scope>:<subject>``.
Now both carry the tenant's hash tag (``bud:{<tenant>}:...``, :func:`~.ledger.counter_key`), so a
gateway upgraded in the middle of a month would read its counters as zero and lose the limits set
through the admin API. This moves them:

* a counter's spend (its total less what it held) is **added** to the new counter, which keeps its
  own expiry or gets the old one: safe to run while upgraded gateways already charge the new
  names, and safe to run twice (a moved key is deleted);
* what old reservations held is dropped with them (reservations live seconds; the gateway that made
  them settled them when it drained);
* limits move only where the new name has none (a limit set after the upgrade wins);
* an API key's counters go under its tenant's tag: the tenant comes from the key's record in the
  store, or from ``key_tenants`` for keys listed in the configuration; a key whose tenant is
  unknown is left where it is and reported.

Runs on a single Redis node (``SCAN`` of every key with the prefix): the earlier versions ran on
one node only (their multi-key scripts fail on a Redis Cluster), so that is where old keys are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import unquote

from .ledger import Subject, counter_key, settings_key

_SCOPES = "tenant|workflow|api_key"
#: Names of the earlier versions: no hash tag (a quoted subject has no ``:`` and no braces).
LEGACY_COUNTER = re.compile(rf"^bud:({_SCOPES}):([^:{{}}]+):([a-z]+):([a-z]+):([0-9]+)$")
LEGACY_SETTINGS = re.compile(rf"^budgetcfg:({_SCOPES}):([^:{{}}]+)$")


@dataclass
class MigrationReport:
    """What :func:`migrate_legacy_keys` moved (or would move, with ``dry_run``)."""

    counters: int = 0
    spend_moved: int = 0
    settings: int = 0
    settings_kept: int = 0  #: limits left alone because the new name already had some
    unresolved_api_keys: set[str] = field(default_factory=set)
    dry_run: bool = False

    def lines(self) -> list[str]:
        verb = "would move" if self.dry_run else "moved"
        out = [f"{verb} {self.counters} counter(s) ({self.spend_moved} units of spend) and "
               f"{self.settings} subject limit(s); {self.settings_kept} limit(s) kept (already set "
               "under the new name)"]
        if self.unresolved_api_keys:
            out.append("left in place, tenant unknown (give --key-tenant ID=TENANT): API key(s) "
                       + ", ".join(sorted(self.unresolved_api_keys)))
        return out


def _tenant_of_key(client, prefix: str, key_id: str, key_tenants: Mapping[str, str]) -> str | None:
    if key_id in key_tenants:
        return key_tenants[key_id]
    digest = client.get(f"{prefix}apikey:id:{key_id}")
    if digest is None:
        return None
    record = client.get(f"{prefix}apikey:h:{digest.decode()}")
    return json.loads(record)["tenant"] if record is not None else None


def _subject(client, prefix: str, scope: str, quoted: str, key_tenants, report) -> Subject | None:
    subject_id = unquote(quoted)
    if scope != "api_key":
        return Subject(scope, subject_id)
    tenant = _tenant_of_key(client, prefix, subject_id, key_tenants)
    if tenant is None:
        report.unresolved_api_keys.add(subject_id)
        return None
    return Subject(scope, subject_id, tenant)


def migrate_legacy_keys(client: Any, *, prefix: str = "extproc:", key_tenants: Mapping[str, str] | None = None,
                        dry_run: bool = False) -> MigrationReport:
    """Move the earlier versions' budget keys under ``prefix`` on ``client`` (a blocking
    ``redis.Redis``) to today's names; see the module docstring."""
    key_tenants = dict(key_tenants or {})
    report = MigrationReport(dry_run=dry_run)
    for raw in client.scan_iter(match=f"{prefix}bud:*", count=1000):
        name = raw.decode()[len(prefix):]
        m = LEGACY_COUNTER.match(name)
        if m is None:  # a new name, or an old one's ``:held``
            continue
        scope, quoted, metric, window, bucket = m.groups()
        subject = _subject(client, prefix, scope, quoted, key_tenants, report)
        if subject is None:
            continue
        old, held = prefix + name, prefix + name + ":held"
        total, reserved = client.get(old), client.get(held)
        spend = int(total or 0) - int(reserved or 0)
        ttl_ms = client.pttl(old)
        new = prefix + counter_key(scope, subject.id, metric, window, bucket, subject.tag)
        report.counters += 1
        report.spend_moved += max(spend, 0)
        if dry_run:
            continue
        pipe = client.pipeline(transaction=False)
        if spend > 0:
            pipe.incrby(new, spend)
        pipe.delete(old, held)
        pipe.execute()
        if spend > 0 and ttl_ms and ttl_ms > 0 and client.pttl(new) < 0:
            client.pexpire(new, ttl_ms)
    for raw in client.scan_iter(match=f"{prefix}budgetcfg:*", count=1000):
        name = raw.decode()[len(prefix):]
        m = LEGACY_SETTINGS.match(name)
        if m is None:
            continue
        scope, quoted = m.groups()
        subject = _subject(client, prefix, scope, quoted, key_tenants, report)
        if subject is None:
            continue
        new = prefix + settings_key(scope, subject.id, subject.tag)
        if client.exists(new):
            report.settings_kept += 1
            if not dry_run:
                client.delete(prefix + name)
            continue
        report.settings += 1
        if not dry_run:
            client.set(new, client.get(prefix + name))
            client.delete(prefix + name)
    return report
