"""Only what the upstream needs goes to it: the client's other request headers are removed.

A client header is a client's business; forwarded to Triton, one of 8 KiB made Triton drop the
connection (503), and ninety of them plus the gateway's own pushed the request past Envoy's header
count (503). The allowlist (``extproc.upstreams.base.FORWARDED_REQUEST_HEADERS``) is tracing only,
plus the user's credentials for a tier with ``forward_authorization``.
"""

from __future__ import annotations

import yaml

from extproc.framework.config import default_config_text
from extproc.framework.testing import GatewayHarness
from extproc.upstreams.base import (FORWARDED_REQUEST_HEADERS, MAX_FORWARDED_HEADER_BYTES,
                                    headers_not_forwarded)

TRACING = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
           "tracestate": "congo=t61rcWkgMzE", "baggage": "user=alice", "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7"}
CLIENT_JUNK = {"cookie": "session=1", "user-agent": "fuzzer/1.0", "accept-encoding": "gzip, br",
               "x-forwarded-for": "10.0.0.1", "x-custom": "c" * 9000, "openai-organization": "org-1"}


def config(**hosted):
    cfg = yaml.safe_load(default_config_text())
    cfg["tiers"]["hosted"] = {"model": "gpt-4o-mini", "kind": "openai", **hosted}
    cfg["plugins"] = [{"name": "model_tiers"}]
    return cfg


def openai_answer() -> list[bytes]:
    return [b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
            b'"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}']


async def test_the_upstream_gets_tracing_and_what_the_gateway_sets_nothing_else():
    many = {f"x-extra-{i}": "v" for i in range(95)}
    async with GatewayHarness(config=config()) as gw:
        result = await gw.chat("hi", model="small", headers={**TRACING, **CLIENT_JUNK, **many})
    assert result.status == 200
    up = result.upstream_headers
    for name, value in TRACING.items():
        assert up[name] == value
    assert up["x-request-id"] == "test-request"
    for name in [*CLIENT_JUNK, *many]:
        assert name not in up
    assert up["content-type"] == "application/json" and up[":path"].startswith("/v2/models/")
    assert up["x-extproc-tier"] == "small"
    assert set(up) - {":method", ":path"} <= FORWARDED_REQUEST_HEADERS | {
        "content-type", "content-length", "x-extproc-tier", "x-extproc-stream"}


async def test_a_forward_authorization_tier_also_gets_the_users_credentials():
    headers = {**CLIENT_JUNK, "authorization": "Bearer user-key"}
    async with GatewayHarness(config=config(forward_authorization=True)) as gw:
        result = await gw.chat("hi", model="hosted", headers=headers, upstream_chunks=openai_answer())
    assert result.upstream_headers["authorization"] == "Bearer user-key"
    assert result.upstream_headers["openai-organization"] == "org-1"
    assert "cookie" not in result.upstream_headers and "x-custom" not in result.upstream_headers


async def test_a_tier_with_its_own_key_never_gets_the_clients_account_headers(monkeypatch):
    monkeypatch.setenv("HOSTED_TEST_KEY", "sk-upstream")
    async with GatewayHarness(config=config(api_key_env="HOSTED_TEST_KEY")) as gw:
        result = await gw.chat("hi", model="hosted", headers={**CLIENT_JUNK, "authorization": "Bearer c"},
                               upstream_chunks=openai_answer())
    assert result.upstream_headers["authorization"] == "Bearer sk-upstream"
    assert "openai-organization" not in result.upstream_headers


async def test_an_oversize_forwarded_header_is_a_431_in_openai_shape():
    async with GatewayHarness(config=config()) as gw:
        result = await gw.chat("hi", model="small", headers={"traceparent": "0" * MAX_FORWARDED_HEADER_BYTES})
    assert result.status == 431
    error = result.json()["error"]
    assert error["code"] == "header_too_large" and error["param"] == "traceparent"
    assert error["type"] == "invalid_request_error"


def test_envoy_owned_headers_are_never_in_the_removal_list():
    """ext_proc may not remove pseudo-headers, host or x-envoy-* (mutation_rules: a failed
    mutation is a 500), so the service never asks."""
    from extproc.framework.config import parse_config

    tier = parse_config(config()).tiers["small"]
    client = {":method": "POST", ":path": "/v1/chat/completions", ":authority": "gw", ":scheme": "http",
              "host": "gw", "x-envoy-expected-rq-timeout-ms": "1", "x-forwarded-proto": "http",
              "cookie": "c", "content-length": "9"}
    assert headers_not_forwarded(client, tier, [("content-length", "12")]) == ["cookie"]


async def test_a_huge_host_with_forwarded_headers_is_a_431_not_a_failed_mutation():
    """What stays of the client's headers (Host is Envoy's until the route rewrites it) plus the
    gateway's must stay inside Envoy's header limit, or Envoy refuses the mutation with a 503."""
    from extproc.upstreams.base import MAX_UPSTREAM_HEADER_BYTES

    async with GatewayHarness(config=config()) as gw:
        result = await gw.chat("hi", model="small", headers={"host": "h" * MAX_UPSTREAM_HEADER_BYTES})
        assert result.status == 431 and result.json()["error"]["code"] == "header_too_large"
        result = await gw.chat("hi", model="small", headers={"host": "h" * 8192, "x-junk": "j" * 50000})
        assert result.status == 200  # the junk is removed, not counted
