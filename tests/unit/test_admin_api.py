"""The admin API: generated code checked fresh, token protection, keys, budgets, spend, CLI."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import grpc
import pytest

from extproc_plugins.admin.v1 import admin_pb2 as pb
from extproc_plugins.admin.v1 import admin_pb2_grpc as pb_grpc
from extproc.commands.cli import main as cli_main
from extproc.framework.testing import GatewayHarness

from ..conftest import ROOT
from .budget_helpers import PEPPER, config_with

TOKEN = "admin-token-0123456789"
GENERATED = ROOT / "extproc_plugins" / "admin" / "v1"
# Lines that name the generator's own version: they change with grpcio-tools, not with the proto.
_VERSION_LINE = re.compile(r"(Protobuf Python Version|GRPC_GENERATED_VERSION|^\s+\d+,$|_runtime_version\.Domain)")


def _normalised(text: str) -> list[str]:
    return [line for line in text.splitlines() if not _VERSION_LINE.search(line)]


def test_generated_code_is_fresh(tmp_path):
    """Regenerate from proto/ into a temp dir with grpcio-tools and compare with the committed code."""
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", str(ROOT / "proto/extproc_plugins/admin/v1/admin.proto")],
                   check=True, cwd=ROOT)
    for name in ("admin_pb2.py", "admin_pb2_grpc.py"):
        fresh = (tmp_path / "extproc_plugins/admin/v1" / name).read_text()
        committed = (GENERATED / name).read_text()
        assert _normalised(fresh) == _normalised(committed), (
            f"extproc_plugins/admin/v1/{name} is stale: regenerate it (see extproc_plugins/admin/__init__.py)")


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("EXTPROC_KEY_PEPPER", PEPPER)
    monkeypatch.setenv("EXTPROC_ADMIN_TOKEN", TOKEN)
    monkeypatch.delenv("EXTPROC_WORKER_INDEX", raising=False)


def gateway_config(**admin):
    return config_with({"name": "tenancy", "settings": {"cache_seconds": 0}},
                       {"name": "budgets", "settings": {"tenants": {"acme": {"tokens_per_day": 100_000}}}},
                       {"name": "admin_api", "settings": {"port": 0, **admin}})


class Admin:
    def __init__(self, port: int, token: str | None = TOKEN):
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.AdminStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []

    def __getattr__(self, name):
        call = getattr(self.stub, name)
        return lambda request: call(request, metadata=self.metadata, timeout=5)


def tenant(name: str) -> pb.Subject:
    return pb.Subject(scope=pb.TENANT, id=name)


async def test_keys_budgets_and_spend_end_to_end_in_process(env):
    async with GatewayHarness(config=gateway_config()) as gw:
        port = gw.gateway.hooks.pm.get_plugin("admin_api").port
        admin = Admin(port)
        created = await admin.CreateKey(pb.CreateKeyRequest(tenant="acme", workflow="search", name="ci"))
        assert created.api_key.startswith(f"sk-ext-{created.key.id}-") and created.key.workflow == "search"
        assert (await admin.GetKey(pb.GetKeyRequest(id=created.key.id))).tenant == "acme"

        headers = {"authorization": f"Bearer {created.api_key}"}
        ok = await gw.chat("hello", headers=headers, answer="a b c")
        assert ok.status == 200
        info = await admin.GetBudget(pb.GetBudgetRequest(subject=tenant("acme")))
        rows = {(w.metric, w.window): w for w in info.windows}
        assert rows[("tokens", "day")].spent == ok.json()["usage"]["total_tokens"]
        assert rows[("tokens", "day")].limit == 100_000
        assert rows[("tokens", "day")].remaining == 100_000 - rows[("tokens", "day")].spent
        assert rows[("requests", "month")].spent == 1  # tracked without a limit
        assert not rows[("requests", "month")].HasField("limit")
        assert info.limits.tokens_per_day == 100_000

        info = await admin.SetBudget(pb.SetBudgetRequest(subject=tenant("acme"), limits=pb.Limits(tokens_per_day=5)))
        assert info.limits.tokens_per_day == 5 and not info.limits.HasField("usd_per_month")
        plugin = gw.gateway.hooks.pm.get_plugin("budgets")
        plugin.ledger._cache.clear()  # the policy caches overrides for settings_cache_seconds
        refused = await gw.chat("hello", headers=headers)
        assert refused.status == 429 and "tenant 'acme': tokens per day" in refused.json()["error"]["message"]
        info = await admin.SetBudget(pb.SetBudgetRequest(subject=tenant("acme"), clear=True))
        assert info.limits.tokens_per_day == 100_000  # the configuration again

        assert (await admin.RevokeKey(pb.RevokeKeyRequest(id=created.key.id))).revoked
        assert (await gw.chat("hello", headers=headers)).status == 401
        await admin.channel.close()


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token"])
async def test_token_is_required(env, token):
    async with GatewayHarness(config=gateway_config()) as gw:
        admin = Admin(gw.gateway.hooks.pm.get_plugin("admin_api").port, token=token)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.CreateKey(pb.CreateKeyRequest(tenant="acme"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await admin.channel.close()


async def test_bad_requests(env):
    async with GatewayHarness(config=gateway_config()) as gw:
        admin = Admin(gw.gateway.hooks.pm.get_plugin("admin_api").port)
        cases = [
            (admin.CreateKey(pb.CreateKeyRequest()), grpc.StatusCode.INVALID_ARGUMENT),
            (admin.RevokeKey(pb.RevokeKeyRequest(id="nope")), grpc.StatusCode.NOT_FOUND),
            (admin.GetKey(pb.GetKeyRequest(id="nope")), grpc.StatusCode.NOT_FOUND),
            (admin.GetBudget(pb.GetBudgetRequest(subject=pb.Subject(id="x"))), grpc.StatusCode.INVALID_ARGUMENT),
            (admin.GetBudget(pb.GetBudgetRequest(subject=pb.Subject(scope=pb.WORKFLOW, id="noslash"))),
             grpc.StatusCode.INVALID_ARGUMENT),
            (admin.SetBudget(pb.SetBudgetRequest(subject=tenant("a"), limits=pb.Limits(tokens_per_day=-1))),
             grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for call, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == code
        await admin.channel.close()


async def test_cli_against_the_server(env, capsys):
    async with GatewayHarness(config=gateway_config()) as gw:
        address = f"127.0.0.1:{gw.gateway.hooks.pm.get_plugin('admin_api').port}"

        def cli(*argv):
            return cli_main(["admin", "--address", address, *argv])

        assert await asyncio.to_thread(cli, "create-key", "--tenant", "acme") == 0
        created = json.loads(capsys.readouterr().out)
        assert created["api_key"].startswith("sk-ext-") and created["key"]["tenant"] == "acme"
        assert await asyncio.to_thread(cli, "set-budget", "tenant", "acme", "--usd-per-month", "12.5",
                                       "--requests-per-minute", "10") == 0
        out = json.loads(capsys.readouterr().out)
        assert out["limits"] == {"requests_per_minute": "10", "usd_per_month": 12.5}
        assert await asyncio.to_thread(cli, "budget", "tenant", "acme") == 0
        assert len(json.loads(capsys.readouterr().out)["windows"]) == 12
        assert await asyncio.to_thread(cli, "revoke-key", "nope") == 1
        assert "NOT_FOUND" in capsys.readouterr().err


def test_cli_hash_key(env, capsys):
    from extproc_plugins.tenancy.api_keys import hash_key

    assert cli_main(["admin", "hash-key", "sk-ext-abc"]) == 0
    assert capsys.readouterr().out.strip() == hash_key(PEPPER.encode(), "sk-ext-abc")


async def test_loopback_only_unless_allowed(env):
    with pytest.raises(Exception, match="not a loopback address"):
        async with GatewayHarness(config=gateway_config(host="0.0.0.0")):
            pass


async def test_only_worker_zero_serves(env, monkeypatch):
    monkeypatch.setenv("EXTPROC_WORKER_INDEX", "1")
    async with GatewayHarness(config=gateway_config()) as gw:
        assert gw.gateway.hooks.pm.get_plugin("admin_api").server is None


async def test_no_token_fails_start_up(env, monkeypatch):
    monkeypatch.setenv("EXTPROC_ADMIN_TOKEN", "short")
    with pytest.raises(Exception, match="no admin token"):
        async with GatewayHarness(config=gateway_config()):
            pass


def test_cli_limit_flags_match_the_ledger():
    from extproc.commands.admin import LIMIT_FIELDS as CLI_FIELDS
    from extproc_plugins.budgets.ledger import LIMIT_FIELDS

    assert CLI_FIELDS == LIMIT_FIELDS == tuple(pb.Limits.DESCRIPTOR.fields_by_name)


def test_the_cli_prints_budget_amounts_with_their_units():
    """`extproc admin budget` used to print usd in unlabelled nano-dollars, as strings."""
    from extproc.commands.admin import readable_budget

    info = {"subject": {"scope": "TENANT", "id": "acme"}, "limits": {"usd_per_day": 2.5, "tokens_per_day": "1000"},
            "windows": [
                {"metric": "usd", "window": "day", "window_start": 1796515200.0, "window_end": 1796601600.0,
                 "spent": "1250000000", "reserved": "30000", "limit": "2500000000", "remaining": "1249970000"},
                {"metric": "tokens", "window": "day", "spent": "120", "reserved": "0", "limit": "1000",
                 "remaining": "880"}]}
    out = readable_budget(info)
    usd, tokens = out["windows"]
    assert usd["unit"] == "USD" and usd["spent"] == 1.25 and usd["reserved"] == 0.00003 and usd["limit"] == 2.5
    assert usd["window_start"] == "2026-12-06T00:00:00+00:00"
    assert tokens == {"metric": "tokens", "window": "day", "spent": 120, "reserved": 0, "limit": 1000,
                      "remaining": 880, "unit": "tokens"}
    assert out["limits"] == info["limits"] and out["subject"] == info["subject"]
