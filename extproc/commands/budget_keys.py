"""``extproc budgets migrate-keys``: move an earlier version's budget counters and limits to
today's key names (:mod:`extproc_plugins.budgets.key_migration`), once, after an upgrade."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="budgets_command", required=True)
    mk = sub.add_parser("migrate-keys", help=__doc__.split("\n\n")[0].replace("``", ""))
    mk.add_argument("--config", help="the gateway's configuration (its state.redis_url and state.key_prefix)")
    mk.add_argument("--redis", metavar="URL", help="the Redis to migrate (default: the configuration's)")
    mk.add_argument("--prefix", help="the key prefix (default: the configuration's state.key_prefix)")
    mk.add_argument("--key-tenant", action="append", default=[], metavar="ID=TENANT",
                    help="the tenant of an API key listed in the configuration (keys created through the "
                         "admin API are looked up in the store)")
    mk.add_argument("--dry-run", action="store_true", help="say what would move, change nothing")
    mk.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from extproc.framework.config import ConfigError, load_config
    from extproc.state.redis_store import is_cluster_url, sync_client
    from extproc_plugins.budgets.key_migration import migrate_legacy_keys

    try:
        state = load_config(args.config).state
    except ConfigError as err:
        print(f"extproc budgets: configuration error:\n{err}", file=sys.stderr)
        return 2
    url = args.redis or state.redis_url
    if not url:
        print("extproc budgets: no Redis: give --redis URL (or a configuration with state.redis_url)",
              file=sys.stderr)
        return 2
    if is_cluster_url(url):
        print("extproc budgets: earlier versions ran on one Redis node, not a cluster: give that node's URL",
              file=sys.stderr)
        return 2
    key_tenants = {}
    for item in args.key_tenant:
        key_id, sep, tenant = item.partition("=")
        if not sep or not key_id or not tenant:
            print(f"extproc budgets: --key-tenant wants ID=TENANT, got {item!r}", file=sys.stderr)
            return 2
        key_tenants[key_id] = tenant
    client = sync_client(url)
    try:
        report = migrate_legacy_keys(client, prefix=args.prefix if args.prefix is not None else state.key_prefix,
                                     key_tenants=key_tenants, dry_run=args.dry_run)
    except (OSError, RedisError) as err:
        print(f"extproc budgets: {err}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print("\n".join(report.lines()))
    return 0
