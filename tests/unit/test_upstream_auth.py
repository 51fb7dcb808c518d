"""How requests authenticate upstream: a client's gateway credentials never reach an upstream.

Triton tiers and OpenAI-kind tiers without settings: the client's ``Authorization`` is removed.
``api_key_env``: the tier's own key replaces it. ``forward_authorization``: passed unchanged.
"""

from __future__ import annotations

import pytest
import yaml

from extproc.commands.cli import main as cli_main
from extproc.framework.config import ConfigError, default_config_text, parse_config
from extproc.framework.gateway import TierRegistry
from extproc.framework.testing import GatewayHarness

CLIENT_AUTH = {"authorization": "Bearer sk-ext-client-key-of-the-gateway"}


def config(**hosted):
    cfg = yaml.safe_load(default_config_text())
    cfg["tiers"]["hosted"] = {"model": "gpt-4o-mini", "kind": "openai", **hosted}
    cfg["plugins"] = [{"name": "model_tiers"}]
    return cfg


def openai_answer() -> list[bytes]:
    return [b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
            b'"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}']


async def test_triton_tier_never_sees_the_clients_credentials():
    async with GatewayHarness(config=config()) as gw:
        result = await gw.chat("hi", model="small", headers=CLIENT_AUTH)
    assert result.status == 200
    assert "authorization" not in result.upstream_headers


async def test_openai_tier_without_a_key_drops_the_clients_credentials():
    async with GatewayHarness(config=config()) as gw:
        result = await gw.chat("hi", model="hosted", headers=CLIENT_AUTH, upstream_chunks=openai_answer())
    assert result.status == 200
    assert "authorization" not in result.upstream_headers


async def test_openai_tier_sends_its_own_key(monkeypatch):
    monkeypatch.setenv("HOSTED_TEST_KEY", "sk-upstream-secret")
    async with GatewayHarness(config=config(api_key_env="HOSTED_TEST_KEY")) as gw:
        result = await gw.chat("hi", model="hosted", headers=CLIENT_AUTH, upstream_chunks=openai_answer())
    assert result.status == 200
    assert result.upstream_headers["authorization"] == "Bearer sk-upstream-secret"
    assert "sk-upstream-secret" not in str(result.headers)  # never echoed to the client


async def test_forward_authorization_passes_the_clients_header_unchanged():
    async with GatewayHarness(config=config(forward_authorization=True)) as gw:
        result = await gw.chat("hi", model="hosted", headers=CLIENT_AUTH, upstream_chunks=openai_answer())
    assert result.upstream_headers["authorization"] == CLIENT_AUTH["authorization"]


def test_missing_key_variable_is_a_configuration_error_naming_the_tier(monkeypatch):
    monkeypatch.delenv("HOSTED_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"tiers\.hosted\.api_key_env: \$HOSTED_TEST_KEY is not set"):
        TierRegistry(parse_config(config(api_key_env="HOSTED_TEST_KEY")))


def test_serve_refuses_to_start_without_the_key(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HOSTED_TEST_KEY", raising=False)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config(api_key_env="HOSTED_TEST_KEY")))
    assert cli_main(["serve", "--config", str(path)]) == 2
    assert "tiers.hosted.api_key_env" in capsys.readouterr().err


@pytest.mark.parametrize("hosted, message", [
    ({"kind": "triton", "api_key_env": "K"}, "only for kind openai"),
    ({"api_key_env": "K", "forward_authorization": True}, "exclude each other"),
])
def test_contradictory_settings_are_refused(hosted, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(config(**hosted))
