"""The tenancy policy: API keys (hashed, revocable) and a trusted header; what each bad input gets."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from extproc_plugins.tenancy.api_keys import KeyRing, PepperMissing, hash_key, key_id_of, load_pepper
from extproc.framework.testing import GatewayHarness
from extproc_plugins.tenancy.tenancy import Tenancy

from .budget_helpers import PEPPER, config_with


@pytest.fixture(autouse=True)
def pepper(monkeypatch):
    monkeypatch.setenv("EXTPROC_KEY_PEPPER", PEPPER)


def tenancy(**settings):
    return config_with({"name": "tenancy", "settings": settings})


async def new_key(gw, tenant="acme", workflow=None):
    ring = KeyRing(gw.gateway.store, PEPPER.encode())
    return await ring.create(tenant, workflow)


async def test_valid_key_sets_tenant_workflow_and_key_id():
    async with GatewayHarness(config=tenancy()) as gw:
        record, key = await new_key(gw, "acme", "search")
        result = await gw.chat("hi", headers={"authorization": f"Bearer {key}"})
    assert result.status == 200
    ctx = result.ctx
    assert (ctx.tenant, ctx.workflow, ctx.api_key_id) == ("acme", "search", record.id)
    assert key_id_of(key) == record.id and key.startswith("sk-ext-")


async def test_keys_are_stored_hashed_only():
    async with GatewayHarness(config=tenancy()) as gw:
        record, key = await new_key(gw)
        store = gw.gateway.store
        dump = b"".join(v for v in store._records.values())
        secret = key.split("-", 3)[3]  # sk-ext-<id>-<secret>; the secret itself may hold "-"
        assert key.encode() not in dump and secret.encode() not in dump
        assert await store.get_record(f"apikey:h:{hash_key(PEPPER.encode(), key)}") is not None


@pytest.mark.parametrize("header, code, message", [
    ("Bearer sk-ext-000000000000-unknownsecretunknownsecret", "invalid_api_key", "Incorrect API key provided"),
    ("Bearer ", "invalid_api_key", "must be 'Bearer"),
    ("Basic dXNlcjpwYXNz", "invalid_api_key", "must be 'Bearer"),
    (None, "missing_api_key", "You didn't provide an API key"),
])
async def test_bad_or_missing_key_is_401(header, code, message):
    async with GatewayHarness(config=tenancy()) as gw:
        result = await gw.chat("hi", headers={"authorization": header} if header is not None else {})
    assert result.status == 401 and result.replied
    err = result.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and message in err["message"]
    assert "unknownsecret" not in err["message"]  # the key is masked


async def test_revoked_key_stops_working_after_the_cache_time():
    async with GatewayHarness(config=tenancy(cache_seconds=0.2)) as gw:
        record, key = await new_key(gw)
        headers = {"authorization": f"Bearer {key}"}
        assert (await gw.chat("hi", headers=headers)).status == 200
        assert await KeyRing(gw.gateway.store, PEPPER.encode()).revoke(record.id)
        await asyncio.sleep(0.25)
        assert (await gw.chat("hi", headers=headers)).status == 401


async def test_configured_key_by_hash():
    key = "sk-ext-abcdefabcdef-configuredkeyconfiguredkey"
    digest = hash_key(PEPPER.encode(), key)
    cfg = tenancy(keys=[{"id": "ops1", "hash": digest, "tenant": "ops", "workflow": "batch"}])
    async with GatewayHarness(config=cfg) as gw:
        result = await gw.chat("hi", headers={"authorization": f"Bearer {key}"})
    assert (result.ctx.tenant, result.ctx.workflow, result.ctx.api_key_id) == ("ops", "batch", "ops1")


async def test_trusted_header_source():
    cfg = tenancy(sources=["api_key", "trusted_header"])
    async with GatewayHarness(config=cfg) as gw:
        result = await gw.chat("hi", headers={"x-extproc-tenant": "beta", "x-extproc-workflow": "chat"})
        assert (result.ctx.tenant, result.ctx.workflow, result.ctx.api_key_id) == ("beta", "chat", None)
        # A key, when present, is checked first: an unknown one is refused even with the header.
        refused = await gw.chat("hi", headers={"x-extproc-tenant": "beta", "authorization": "Bearer nope"})
        assert refused.status == 401


async def test_not_required_means_anonymous():
    async with GatewayHarness(config=tenancy(require=False)) as gw:
        result = await gw.chat("hi")
    assert result.status == 200 and result.ctx.tenant == "anonymous"


def test_trusted_header_must_be_one_envoy_strips():
    with pytest.raises(ValidationError, match="must start with 'x-extproc-'"):
        Tenancy.Settings(sources=["trusted_header"], tenant_header="x-tenant")


def test_pepper_is_required(monkeypatch, tmp_path):
    monkeypatch.delenv("EXTPROC_KEY_PEPPER")
    with pytest.raises(PepperMissing):
        load_pepper()
    (tmp_path / "pepper").write_text("p" * 32 + "\n")
    assert load_pepper(file=str(tmp_path / "pepper")) == b"p" * 32


async def test_store_down_is_503_never_a_pass():
    class DownStore:
        async def get_record(self, key):
            from extproc.state.store import StoreUnavailable

            raise StoreUnavailable("down")

    async with GatewayHarness(config=tenancy()) as gw:
        plugin = gw.gateway.hooks.pm.get_plugin("tenancy")
        plugin.ring.store = DownStore()
        result = await gw.chat("hi", headers={"authorization": "Bearer sk-ext-000000000000-whatever-key"})
    assert result.status == 503 and result.headers["retry-after"] == "1"
    assert result.json()["error"]["code"] == "auth_unavailable"


async def test_key_cache_is_bounded():
    from extproc.state.memory import MemoryStore

    ring = KeyRing(MemoryStore(), PEPPER.encode(), cache_size=10)
    for i in range(25):
        assert await ring.lookup(f"sk-ext-unknown-{i}") is None
    assert len(ring._cache) <= 10


async def test_models_list_needs_a_valid_key_when_tenancy_requires_one():
    async def models(gw, headers):
        life = gw.gateway.new_stream()
        return await life.request_headers({":method": "GET", ":path": "/v1/models", **headers}, True)

    async with GatewayHarness(config=tenancy()) as gw:
        _, key = await new_key(gw)
        missing = await models(gw, {})
        unknown = await models(gw, {"authorization": "Bearer sk-ext-000000000000-unknownsecretunknownsecret"})
        listed = await models(gw, {"authorization": f"Bearer {key}"})
    assert missing.status == 401 and b"missing_api_key" in missing.body
    assert unknown.status == 401 and b"invalid_api_key" in unknown.body
    assert listed.status == 200 and b'"object":"list"' in listed.body.replace(b" ", b"")
    async with GatewayHarness(config=tenancy(require=False)) as gw:  # no key needed: listed as before
        assert (await models(gw, {})).status == 200
