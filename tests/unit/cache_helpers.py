"""Helpers shared by the caching policies' unit tests."""

from __future__ import annotations

import json
import uuid

from extproc.framework.config import load_config
from extproc.framework.testing import GatewayHarness


def config(redis_url: str | None = None, prefix: str | None = None, plugins=None):
    """The embedded default config with only model_tiers (plus ``plugins``), memory or Redis state."""
    state = {"redis_url": redis_url, "key_prefix": prefix or f"t{uuid.uuid4().hex[:8]}:"}
    return load_config(None, overrides={"plugins": [{"name": "model_tiers"}, *(plugins or [])], "state": state})


def harness(plugin, settings=None, *, redis_url=None, prefix=None, on_error="fail_closed", plugins=None):
    return GatewayHarness(plugin, settings=settings, config=config(redis_url, prefix, plugins), on_error=on_error)


def chat_body(content: str, *, stream: bool = False, temperature: float | None = 0, system: str | None = None,
              **extra) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    body = {"model": "auto", "messages": messages, "stream": stream, **extra}
    if temperature is not None:
        body["temperature"] = temperature
    return body


def content(result) -> str:
    """The answer text of a JSON or SSE result."""
    if result.headers.get("content-type", "").startswith("text/event-stream") or result.body.startswith(b"data:"):
        text = ""
        for data in result.events():
            if data == "[DONE]":
                continue
            for choice in json.loads(data).get("choices", []):
                text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
        return text
    choice = result.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


class UpstreamCounter:
    """Counts what reached the (fake) upstream: a result that was not replied."""

    def __init__(self):
        self.calls = 0

    def see(self, result):
        if not result.replied:
            self.calls += 1
        return result


class TenantFromHeader:
    """Test-only: the tenant named by the ``x-test-tenant`` header (the tenancy policy's job in production)."""

    from extproc.framework.hookspecs import hookimpl

    @hookimpl
    def extproc_request_headers(self, ctx):
        ctx.tenant = ctx.headers.get("x-test-tenant", "anonymous")


def plugin_of(gw, name: str):
    """The registered instance of a plugin in a harness."""
    return next(p.obj for p in gw.gateway.hooks.plugins if p.name == name)


async def semantic_hits(plugin, pairs) -> list[bool]:
    """For each ``(a, b)``: store an answer for ``a``, then whether ``b`` is served from the semantic
    cache (each pair in its own scope, a system prompt naming it, so pairs never see each other)."""
    out = []
    async with harness(plugin) as gw:
        for i, (a, b) in enumerate(pairs):
            await gw.send(chat_body(a, system=f"pair {i}"), answer="stored")
            r = await gw.send(chat_body(b, system=f"pair {i}"), answer="fresh")
            out.append(r.replied and r.headers.get("x-extproc-cache") == "semantic_hit")
    return out
