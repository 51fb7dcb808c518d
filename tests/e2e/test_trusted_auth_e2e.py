"""Tenant identity from Envoy's own authentication, through real Envoy, Triton, Redis and the service.

Envoy runs ``envoy-trusted-auth.yaml``'s shape (basic_auth after the strip of client-sent
``x-extproc-*`` headers, forwarding the user name as ``x-extproc-tenant``) with two users of the
test's own; the gateway's ``tenancy`` plugin trusts only that header. Budgets per tenant show who
each request was charged to: alice may make 2 requests a day, bob 1.
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from extproc.commands.envoy_config import dump_config, htpasswd_sha, load_config, trusted_auth_config_dict

from ..conftest import ROOT

pytestmark = pytest.mark.e2e

CONFIG = ROOT / "tests" / "e2e" / "trusted-auth-e2e.yaml"
USERS = {"alice": "alice-password-1", "bob": "bob-password-2"}
HI = [{"role": "user", "content": "hi"}]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def gateway(make_stack, stack, tmp_path_factory):
    """Service + Envoy (basic_auth) in front of the session stack's Triton, on the test Redis."""
    work = tmp_path_factory.mktemp("trusted-auth")
    envoy_src = work / "envoy-trusted-auth.yaml"
    users = "\n".join(htpasswd_sha(u, p) for u, p in USERS.items())
    envoy_src.write_text(dump_config(trusted_auth_config_dict(load_config(ROOT / "envoy" / "envoy.yaml"), users)))
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["state"]["key_prefix"] += f"{uuid.uuid4().hex[:8]}:"  # a fresh day's budgets every run
    config = work / "gateway.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return make_stack(config, share_triton_with=stack, workers=1, envoy_yaml=envoy_src)


def client(gw, authorization: str, **headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0,
                         default_headers={"Authorization": authorization, **headers})


def post(gw, headers: dict) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/chat/completions", headers=headers,
                      json={"model": "small", "messages": HI}, timeout=30)


def test_no_credentials_is_envoys_401_in_openai_format(gateway):
    r = post(gateway, {})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.json()["error"]["type"] == "invalid_request_error"
    # The tenant header alone, without credentials, gets nowhere either.
    r = post(gateway, {"x-extproc-tenant": "alice"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_wrong_password_is_401(gateway):
    with pytest.raises(openai.AuthenticationError) as err:
        client(gateway, basic("alice", "not-her-password")).chat.completions.create(model="small", messages=HI)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"


def test_tenant_is_the_authenticated_user_whatever_header_the_client_sends(gateway):
    # alice claims to be bob in every internal header; Envoy strips them before basic_auth sets
    # x-extproc-tenant: alice, so both requests are charged to alice and bob's single one is left.
    spoofing = client(gateway, basic("alice", USERS["alice"]),
                      **{"x-extproc-tenant": "bob", "x-extproc-workflow": "evil"})
    for _ in range(2):
        reply = spoofing.chat.completions.create(model="small", max_tokens=2, messages=HI)
        assert reply.usage.total_tokens > 0
    with pytest.raises(openai.RateLimitError) as err:
        spoofing.chat.completions.create(model="small", max_tokens=2, messages=HI)
    assert err.value.body["code"] == "budget_exceeded"
    assert "alice" in err.value.response.headers["x-extproc-budget"]

    bob = client(gateway, basic("bob", USERS["bob"]))
    assert bob.chat.completions.create(model="small", max_tokens=2, messages=HI).usage.total_tokens > 0
    with pytest.raises(openai.RateLimitError) as err:
        bob.chat.completions.create(model="small", max_tokens=2, messages=HI)
    assert "bob" in err.value.response.headers["x-extproc-budget"]
