"""The admin API service (grpc.aio) over the shared store: keys, budgets, spend.

It holds no state of its own: keys and budget overrides are store records, spend is the budget
counters (:mod:`extproc_plugins.tenancy.api_keys`, :mod:`extproc_plugins.budgets.ledger`). So it answers the same from
any process that has the same store; with the in-memory store only the worker serving it sees
what it changed (use Redis with more than one worker).

Every call needs ``authorization: Bearer <token>`` metadata; the token is compared in constant
time. Errors: UNAUTHENTICATED (token), INVALID_ARGUMENT (bad request, named), NOT_FOUND,
UNAVAILABLE (the store is unreachable).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

import grpc
from pydantic import ValidationError

from extproc_plugins.tenancy.api_keys import KeyRecord, KeyRing
from extproc_plugins.budgets.ledger import LIMIT_FIELDS, SCOPES, BudgetLedger, Limits, Subject
from extproc.state.store import StoreUnavailable
from extproc_plugins.admin.v1 import admin_pb2 as pb
from extproc_plugins.admin.v1 import admin_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_SCOPE_NAMES = {pb.TENANT: "tenant", pb.WORKFLOW: "workflow", pb.API_KEY: "api_key"}
_SCOPE_VALUES = {v: k for k, v in _SCOPE_NAMES.items()}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def limits_to_pb(limits: Limits | None) -> pb.Limits:
    out = pb.Limits()
    if limits is not None:
        for name, value in limits.compact().items():
            setattr(out, name, value)
    return out


def limits_from_pb(message: pb.Limits) -> Limits:
    return Limits.model_validate({name: getattr(message, name) for name in LIMIT_FIELDS if message.HasField(name)})


def key_info(record: KeyRecord) -> pb.KeyInfo:
    return pb.KeyInfo(id=record.id, tenant=record.tenant, workflow=record.workflow or "", name=record.name,
                      created=record.created)


class AdminService(pb_grpc.AdminServicer):
    """The Admin service; ``keys`` may be None when no pepper is configured (key calls then fail)."""

    def __init__(self, token: str, keys: KeyRing | None, ledger: BudgetLedger):
        if not token:
            raise ValueError("the admin API needs a token")
        self._token = token.encode()
        self.keys = keys
        self.ledger = ledger

    async def _check(self, context) -> None:
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                presented = value
        scheme, _, token = presented.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token")

    async def _subject(self, message, context) -> Subject:
        scope = _SCOPE_NAMES.get(message.scope)
        if scope is None or not message.id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"subject: a scope ({', '.join(SCOPES)}) and an id are needed")
        if scope == "workflow" and "/" not in message.id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "subject.id: a workflow is '<tenant>/<workflow>'")
        if scope == "api_key":  # its counters and settings are under its tenant's hash tag
            return Subject(scope, message.id, await self._key_tenant(message.id, context))
        return Subject(scope, message.id)

    async def _key_tenant(self, key_id: str, context) -> str | None:
        """The tenant of an API key (configured or created), None when the key is unknown here."""
        if self.keys is None:
            return None
        for record in self.keys.configured.values():
            if record.id == key_id:
                return record.tenant
        record = await self._store_call(context, self.keys.get(key_id))
        return record.tenant if record is not None else None

    async def _keys(self, context) -> KeyRing:
        if self.keys is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "API keys are not configured on this gateway (no pepper)")
        return self.keys

    async def _info(self, subject: Subject) -> pb.BudgetInfo:
        report = await self.ledger.report(subject)
        info = pb.BudgetInfo(subject=pb.Subject(scope=_SCOPE_VALUES[subject.scope], id=subject.id),
                             limits=limits_to_pb(Limits.model_validate(report["limits"])))
        for row in report["windows"]:
            w = info.windows.add(metric=row["metric"], window=row["window"], window_start=row["window_start"],
                                 window_end=row["window_end"], spent=row["spent"], reserved=row["reserved"])
            if row["limit"] is not None:
                w.limit = row["limit"]
                w.remaining = row["remaining"]
        return info

    async def _store_call(self, context, coro):
        try:
            return await coro
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the shared store is unreachable: {exc}")

    # the calls -------------------------------------------------------------------------------
    async def CreateKey(self, request, context):
        await self._check(context)
        keys = await self._keys(context)
        if not request.tenant:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "tenant: required")
        record, key = await self._store_call(context, keys.create(request.tenant, request.workflow or None,
                                                                  request.name))
        log.info("admin: created API key %s for tenant %s", record.id, record.tenant)
        return pb.CreateKeyResponse(key=key_info(record), api_key=key)

    async def RevokeKey(self, request, context):
        await self._check(context)
        keys = await self._keys(context)
        revoked = await self._store_call(context, keys.revoke(request.id))
        if not revoked:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no API key {request.id!r}")
        log.info("admin: revoked API key %s", request.id)
        return pb.RevokeKeyResponse(revoked=True)

    async def GetKey(self, request, context):
        await self._check(context)
        keys = await self._keys(context)
        record = await self._store_call(context, keys.get(request.id))
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no API key {request.id!r}")
        return key_info(record)

    async def SetBudget(self, request, context):
        await self._check(context)
        subject = await self._subject(request.subject, context)
        if request.clear:
            limits = None
        else:
            try:
                limits = limits_from_pb(request.limits)
            except ValidationError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limits: {err.errors()[0]['msg']}")
        await self._store_call(context, self.ledger.set_limits(subject, limits))
        log.info("admin: %s limits of %s", "cleared" if limits is None else "set", subject.describe())
        return await self._store_call(context, self._info(subject))

    async def GetBudget(self, request, context):
        await self._check(context)
        subject = await self._subject(request.subject, context)
        return await self._store_call(context, self._info(subject))


async def start_admin_server(service: AdminService, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Serve ``service`` on ``host:port`` (no SO_REUSEPORT: one process owns the port)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_AdminServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"admin API: cannot listen on {host}:{port}")
    await server.start()
    return server, bound
