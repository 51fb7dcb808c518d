"""The admin API server (``proto/extproc_plugins/admin/v1/admin.proto``): keys, budgets, spend.

Off unless this plugin is configured. It listens on its own port, on loopback unless
``allow_non_loopback: true`` (then put TLS in front of it: the API is plain gRPC), and every call
needs the token from ``$EXTPROC_ADMIN_TOKEN`` (``token_env``) or ``token_file``; start-up fails
without one (at least 16 characters).

**Where it runs: in worker 0 only** (``EXTPROC_WORKER_INDEX``, set by ``extproc serve``). The
service is stateless over the shared store, so with Redis any process would do; one worker keeps
it off the parent (which only supervises and must stay simple and sync) and binds the port once.
With the in-memory store and ``server.workers: 1`` it is the very process that enforces the
budgets, so it sees and changes the same state; with several workers and no Redis what it shows is
worker 0's state only (the ``budgets`` plugin refuses that setup unless told otherwise).

The key pepper and the configured budget tables are read from the ``tenancy`` and ``budgets``
entries of the same configuration, so the admin API and the policies always agree.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from extproc import environment
from extproc_plugins.admin.service import AdminService, is_loopback, start_admin_server
from extproc_plugins.tenancy.api_keys import KeyRecord, KeyRing, PepperMissing, load_pepper
from extproc_plugins.budgets.ledger import BudgetTables, ledger_from_tables
from extproc.framework.hookspecs import hookimpl

log = logging.getLogger(__name__)

WORKER_INDEX_ENV = environment.WORKER_INDEX


class AdminApi:
    """Serve the admin API on its own port from worker 0."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        host: str = "127.0.0.1"
        port: int = Field(50052, ge=0, le=65535)
        allow_non_loopback: bool = False
        token_env: str = "EXTPROC_ADMIN_TOKEN"
        token_file: str | None = None

    def __init__(self, settings: "AdminApi.Settings"):
        self.settings = settings
        self.server = None
        self.port: int | None = None

    def _token(self) -> str:
        s = self.settings
        token = Path(s.token_file).read_text().strip() if s.token_file else environment.named(s.token_env).strip()
        if len(token) < 16:
            where = f"file {s.token_file}" if s.token_file else f"${s.token_env}"
            raise RuntimeError(f"admin_api: no admin token of at least 16 characters in {where}")
        return token

    @hookimpl
    async def extproc_startup(self, gateway):
        s = self.settings
        if not is_loopback(s.host) and not s.allow_non_loopback:
            raise RuntimeError(f"admin_api: {s.host} is not a loopback address; set allow_non_loopback: true "
                               "to serve the admin API there (and protect it with TLS in front)")
        if environment.worker_index() != "0":
            return
        entries = {e.name: e.settings for e in (gateway.config.plugins or [])}
        tenancy = entries.get("tenancy", {})
        try:
            pepper = load_pepper(tenancy.get("pepper_env", "EXTPROC_KEY_PEPPER"), tenancy.get("pepper_file"))
            configured = {k["hash"].lower(): KeyRecord(k["id"], k["tenant"], k.get("workflow"), "configured")
                          for k in tenancy.get("keys", [])}
            keys = KeyRing(gateway.store, pepper, configured=configured, cache_seconds=0)
        except PepperMissing as exc:
            log.warning("admin_api: key calls disabled: %s", exc)
            keys = None
        budgets = entries.get("budgets", {})
        ledger = ledger_from_tables(gateway.store, BudgetTables.from_plugin_settings(budgets), settings_ttl=0)
        service = AdminService(self._token(), keys, ledger)
        self.server, self.port = await start_admin_server(service, s.host, s.port)
        log.info("admin API on %s:%d (worker %d)", s.host, self.port, os.getpid())

    @hookimpl
    async def extproc_shutdown(self, gateway):
        if self.server is not None:
            await self.server.stop(1.0)
            self.server = None
