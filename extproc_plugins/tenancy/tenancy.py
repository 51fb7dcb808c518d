"""Tenancy: who is calling. Sets ``ctx.tenant``, ``ctx.workflow`` and ``ctx.api_key_id``.

Two sources, tried in the configured order (the first that names a tenant wins):

* ``api_key``: ``Authorization: Bearer sk-ext-...``, looked up by its keyed hash
  (:mod:`extproc_plugins.tenancy.api_keys`; keys are created through the admin API or listed by hash in the
  configuration). An unknown, revoked or malformed key is a 401 ``invalid_api_key``.
* ``trusted_header``: ``x-extproc-tenant`` (and ``x-extproc-workflow``) set by Envoy after its own
  authentication (basic_auth as in ``envoy/envoy-trusted-auth.yaml``, or a JWT or ext_authz filter,
  placed after the strip filter). Envoy removes every
  ``x-extproc-*`` header a client sends before any filter runs (``envoy/envoy.yaml``,
  ``early_header_mutation_extensions``), so a client cannot claim a tenant this way; that is why
  the header names must start with ``x-extproc-``.

No identity at all is a 401 ``missing_api_key`` when ``require`` is set (the default), else the
request goes on as tenant ``anonymous``. The key store unreachable (and the key not cached) is a 503
``auth_unavailable`` with ``Retry-After: 1``: never an unauthenticated pass.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from extproc_plugins.tenancy.api_keys import KeyRecord, KeyRing, load_pepper
from extproc.wire.decisions import Reply
from extproc.framework.hookspecs import hookimpl
from extproc.formats.openai import OpenAIError
from extproc.state.store import StoreUnavailable

TRUSTED_PREFIX = "x-extproc-"


class ConfiguredKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    hash: str = Field(description="HMAC-SHA256(pepper, key), hex: `extproc admin hash-key` prints it")
    tenant: str
    workflow: str | None = None


def _mask(key: str) -> str:
    return f"{key[:10]}***{key[-4:]}" if len(key) > 16 else "***"


class Tenancy:
    """Identify the tenant from an API key or a header Envoy set after authenticating."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        sources: list[Literal["api_key", "trusted_header"]] = Field(default_factory=lambda: ["api_key"], min_length=1)
        require: bool = Field(True, description="no identity: 401 (true) or tenant 'anonymous' (false)")
        tenant_header: str = "x-extproc-tenant"
        workflow_header: str = "x-extproc-workflow"
        pepper_env: str = "EXTPROC_KEY_PEPPER"
        pepper_file: str | None = None
        cache_seconds: float = Field(5.0, ge=0, description="how long a key lookup is cached (revocation delay)")
        keys: list[ConfiguredKey] = Field(default_factory=list)

        @field_validator("tenant_header", "workflow_header")
        @classmethod
        def _stripped_by_envoy(cls, value: str) -> str:
            value = value.lower()
            if not value.startswith(TRUSTED_PREFIX):
                raise ValueError(f"must start with {TRUSTED_PREFIX!r}: Envoy strips only those from clients, "
                                 "so any other header could be sent by a client to claim a tenant")
            return value

    def __init__(self, settings: "Tenancy.Settings"):
        self.settings = settings
        self.ring: KeyRing | None = None

    @hookimpl
    def extproc_startup(self, gateway):
        s = self.settings
        if "api_key" in s.sources:
            pepper = load_pepper(s.pepper_env, s.pepper_file)
            configured = {k.hash.lower(): KeyRecord(k.id, k.tenant, k.workflow, "configured") for k in s.keys}
            self.ring = KeyRing(gateway.store, pepper, configured=configured, cache_seconds=s.cache_seconds)

    @hookimpl
    async def extproc_request_headers(self, ctx):
        # timed by the plugin manager (ctx.timings_ms["plugin:tenancy"])
        for source in self.settings.sources:
            if source == "api_key":
                header = ctx.headers.get("authorization")
                if header is not None:
                    return await self._from_key(ctx, header)
            else:
                tenant = ctx.headers.get(self.settings.tenant_header, "").strip()
                if tenant:
                    ctx.tenant = tenant
                    ctx.workflow = ctx.headers.get(self.settings.workflow_header, "").strip() or None
                    ctx.route_trace.append(f"tenancy: tenant {tenant} from {self.settings.tenant_header}")
                    return None
        if self.settings.require:
            raise OpenAIError(
                401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                type="invalid_request_error", code="missing_api_key")
        return None

    async def _from_key(self, ctx, header: str):
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise OpenAIError(401, "The Authorization header must be 'Bearer <API key>'.",
                              type="invalid_request_error", code="invalid_api_key")
        try:
            record = await self.ring.lookup(token)
        except StoreUnavailable:
            err = OpenAIError(503, "The gateway cannot check API keys right now; please retry.",
                              type="server_error", code="auth_unavailable")
            return Reply(503, err.to_json(), [("content-type", "application/json"), ("retry-after", "1")],
                         details="extproc_auth_unavailable")
        if record is None:
            raise OpenAIError(401, f"Incorrect API key provided: {_mask(token)}.",
                              type="invalid_request_error", code="invalid_api_key")
        ctx.tenant, ctx.workflow, ctx.api_key_id = record.tenant, record.workflow, record.id
        ctx.route_trace.append(f"tenancy: tenant {record.tenant} from key {record.id}")
        return None


