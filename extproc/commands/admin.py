"""``extproc admin ...``: the admin API from the command line (JSON out).

    export EXTPROC_ADMIN_TOKEN=...                      # the gateway's admin token
    extproc admin create-key --tenant acme --workflow search
    extproc admin set-budget tenant acme --tokens-per-day 1000000 --usd-per-month 50
    extproc admin budget tenant acme                    # limits, spent, reserved, remaining
    extproc admin revoke-key 3f2a9c01b7e4
    extproc admin hash-key sk-ext-...                   # local: the hash to list a key in the config
"""

from __future__ import annotations

import argparse
import json
import sys

from extproc import environment

# The same names as extproc_plugins.budgets.ledger.LIMIT_FIELDS, without importing it: `extproc serve`
# builds this parser too, and its start-up (until the signal handlers are in) must stay quick.
LIMIT_FIELDS = tuple(f"{m}_per_{w}" for m in ("requests", "tokens", "usd") for w in ("minute", "hour", "day", "month"))

SCOPES = {"tenant": "TENANT", "workflow": "WORKFLOW", "api_key": "API_KEY"}


def add_admin_parser(sub) -> None:
    """Register ``admin`` and its sub-commands on the ``extproc`` parser."""
    admin = sub.add_parser("admin", help="the gateway's admin API: keys, budgets, spend")
    admin.add_argument("--address", default=environment.admin_address("127.0.0.1:50052"),
                       help="host:port of the admin API (default $EXTPROC_ADMIN_ADDRESS or 127.0.0.1:50052)")
    admin.add_argument("--token-env", default="EXTPROC_ADMIN_TOKEN", help="environment variable holding the token")
    admin.add_argument("--timeout", type=float, default=5.0)
    asub = admin.add_subparsers(dest="admin_command", required=True)

    create = asub.add_parser("create-key", help="a new API key (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--workflow", default="")
    create.add_argument("--name", default="")

    for name, helptext in (("revoke-key", "revoke a key by id"), ("get-key", "a key's tenant and workflow")):
        p = asub.add_parser(name, help=helptext)
        p.add_argument("id")

    setb = asub.add_parser("set-budget", help="set a subject's limits (unset ones: no limit)")
    setb.add_argument("scope", choices=sorted(SCOPES))
    setb.add_argument("subject", help="tenant id, '<tenant>/<workflow>', or key id")
    for field in LIMIT_FIELDS:
        setb.add_argument("--" + field.replace("_", "-"), type=float if field.startswith("usd") else int)
    setb.add_argument("--clear", action="store_true", help="remove the override (the configuration applies)")

    budget = asub.add_parser("budget", help="limits in force, spent, reserved and remaining per window")
    budget.add_argument("scope", choices=sorted(SCOPES))
    budget.add_argument("subject")
    budget.add_argument("--raw", action="store_true",
                        help="the API's own form (int64 amounts as strings; usd in nano-dollars)")

    hashk = asub.add_parser("hash-key", help="print a key's stored hash (uses the pepper; no server needed)")
    hashk.add_argument("key")
    hashk.add_argument("--pepper-env", default="EXTPROC_KEY_PEPPER")
    hashk.add_argument("--pepper-file")
    admin.set_defaults(func=run)


def run(args) -> int:
    if args.admin_command == "hash-key":
        from extproc_plugins.tenancy.api_keys import PepperMissing, hash_key, load_pepper

        try:
            print(hash_key(load_pepper(args.pepper_env, args.pepper_file), args.key))
        except PepperMissing as exc:
            print(f"extproc admin: {exc}", file=sys.stderr)
            return 2
        return 0

    import grpc
    from google.protobuf.json_format import MessageToDict

    from extproc_plugins.admin.v1 import admin_pb2 as pb
    from extproc_plugins.admin.v1 import admin_pb2_grpc as pb_grpc

    token = environment.named(args.token_env)
    if not token:
        print(f"extproc admin: set ${args.token_env} to the gateway's admin token", file=sys.stderr)
        return 2
    metadata = [("authorization", f"Bearer {token}")]
    with grpc.insecure_channel(args.address) as channel:
        stub = pb_grpc.AdminStub(channel)
        cmd = args.admin_command
        try:
            if cmd == "create-key":
                reply = stub.CreateKey(pb.CreateKeyRequest(tenant=args.tenant, workflow=args.workflow, name=args.name),
                                       metadata=metadata, timeout=args.timeout)
            elif cmd == "revoke-key":
                reply = stub.RevokeKey(pb.RevokeKeyRequest(id=args.id), metadata=metadata, timeout=args.timeout)
            elif cmd == "get-key":
                reply = stub.GetKey(pb.GetKeyRequest(id=args.id), metadata=metadata, timeout=args.timeout)
            else:
                subject = pb.Subject(scope=getattr(pb, SCOPES[args.scope]), id=args.subject)
                if cmd == "set-budget":
                    limits = pb.Limits(**{f: getattr(args, f) for f in LIMIT_FIELDS if getattr(args, f) is not None})
                    reply = stub.SetBudget(pb.SetBudgetRequest(subject=subject, limits=limits, clear=args.clear),
                                           metadata=metadata, timeout=args.timeout)
                else:
                    reply = stub.GetBudget(pb.GetBudgetRequest(subject=subject), metadata=metadata,
                                           timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"extproc admin: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    out = MessageToDict(reply, preserving_proto_field_name=True)
    if cmd in ("budget", "set-budget") and not getattr(args, "raw", False):
        out = readable_budget(out)
    print(json.dumps(out, indent=2))
    return 0


#: WindowSpend's amount fields (int64: MessageToDict gives strings).
_AMOUNTS = ("spent", "reserved", "limit", "remaining")


def readable_budget(info: dict) -> dict:
    """A BudgetInfo as people read it: each window's amounts as numbers with their ``unit``, usd
    in dollars (the API counts it in nano-dollars, 1e-9 USD), window bounds as UTC times."""
    from datetime import datetime, timezone

    out = dict(info)
    windows = []
    for w in info.get("windows", []):
        w = dict(w)
        usd = w.get("metric") == "usd"
        for key in _AMOUNTS:
            if key in w:
                w[key] = int(w[key]) / 1e9 if usd else int(w[key])
        w["unit"] = "USD" if usd else w.get("metric", "")
        for key in ("window_start", "window_end"):
            if key in w:
                w[key] = datetime.fromtimestamp(float(w[key]), timezone.utc).isoformat(timespec="seconds")
        windows.append(w)
    if windows:
        out["windows"] = windows
    return out


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - extproc admin is the entry
    parser = argparse.ArgumentParser(prog="extproc")
    add_admin_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
