"""``extproc route --explain "prompt"``: the routing decision for a request, without sending it.

The request runs through the very code the gateway runs -- a :class:`~extproc.framework.gateway.Gateway`
built from the same configuration, its plugins in the same order, the real
:class:`~extproc.framework.lifecycle.RequestLifecycle` -- up to the point where the request would leave
for the tier's cluster. Nothing is sent anywhere: the lifecycle's answer to the body phase is
the upstream request itself, which is only described. The stream is then closed as if the client
had left, so policies release whatever they reserved (``extproc_request_finished`` sees
``outcome == "aborted"``).

Plugins that have no say in the decision -- those implementing none of the request-phase hooks,
such as the request log, usage records and metrics -- are left out, so a dry run is not logged,
billed or counted as traffic; every plugin that can answer, narrow, decide or adjust runs.

Shared state is isolated by default (an in-memory store: explaining a request must not spend a
tenant's budget or count against its rate limit in Redis); ``shared_state=True`` uses the
configured store, to see decisions that depend on it (a tenant over its soft budget). Requests
carry the ``x-extproc-explain: 1`` header, which Envoy strips from real clients, so a policy
with side effects elsewhere can tell a dry run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from extproc.framework.config import GatewayConfig, PluginEntry, StateConfig
from extproc.wire.decisions import Reply
from extproc.framework.hookspecs import REQUEST_PHASE_HOOKS

EXPLAIN_HEADER = "x-extproc-explain"


@dataclass
class Explanation:
    """What the gateway decided for one request."""

    status: int | None  # None: the request would go upstream; else the gateway's own answer
    tier: str | None
    model: str | None  # the tier's upstream model
    reason: str
    trace: list[str]
    upstream_path: str | None = None
    error: dict | None = None
    prompt_tokens: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # plugins with no say in routing, not run

    def to_dict(self) -> dict:
        return {"status": self.status, "tier": self.tier, "model": self.model, "reason": self.reason,
                "trace": self.trace, "upstream_path": self.upstream_path, "error": self.error,
                "prompt_tokens": self.prompt_tokens, "degraded": self.degraded, "left_out": self.left_out,
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}}

    def format(self) -> str:
        lines = ["decision chain:"]
        lines += [f"  {i}. {step}" for i, step in enumerate(self.trace, 1)] or ["  (no routing policy said anything)"]
        if self.status is not None:
            err = (self.error or {}).get("error", {})
            lines.append(f"answered by the gateway: {self.status} {err.get('code') or ''} {err.get('message') or ''}".rstrip())
        else:
            lines.append(f"tier: {self.tier} (model {self.model})   reason: {self.reason}")
            lines.append(f"upstream: POST {self.upstream_path}   (not sent)")
        if self.degraded:
            lines.append(f"degraded (fail-open plugins that failed): {', '.join(self.degraded)}")
        per_plugin = {k.split(":", 1)[1]: v for k, v in self.timings_ms.items() if k.startswith("plugin:")}
        if per_plugin:
            lines.append("time per plugin: " + ", ".join(f"{k} {v:.2f} ms" for k, v in per_plugin.items()))
        if self.left_out:
            lines.append(f"not run (no say in routing): {', '.join(self.left_out)}")
        return "\n".join(lines)


def isolated(config: GatewayConfig) -> GatewayConfig:
    """``config`` with its shared state in memory (nothing written to the configured Redis), as
    the one process it runs in (``server.workers: 1``, so policies that refuse per-worker memory
    state with several workers, like ``budgets``, start)."""
    return config.model_copy(update={
        "state": StateConfig(redis_url=None, key_prefix=config.state.key_prefix),
        "server": config.server.model_copy(update={"workers": 1}),
    })


def deciding_plugins(config: GatewayConfig) -> tuple[GatewayConfig, list[str]]:
    """``config`` with only the plugins that implement a request-phase hook, and the names left out."""
    from extproc.framework.gateway import Gateway
    from extproc.framework.plugin_manager import DEFAULT_PLUGINS

    probe = Gateway(isolated(config))  # loads (does not start) every configured plugin
    deciding = {name for hook in REQUEST_PHASE_HOOKS for name in probe.hooks.implementers(hook)}
    entries = config.plugins if config.plugins is not None else [PluginEntry(name=n) for n in DEFAULT_PLUGINS]
    kept = [e for e in entries if e.name in deciding or not e.enabled]
    left_out = [n for n in probe.plugin_names if n not in deciding]
    return config.model_copy(update={"plugins": kept}), left_out


async def explain_request(gateway, body: dict | bytes, *, headers: dict[str, str] | None = None,
                          path: str = "/v1/chat/completions") -> Explanation:
    """Run one request through ``gateway``'s lifecycle up to the upstream call, and describe it.

    :param gateway: a started :class:`~extproc.framework.gateway.Gateway`.
    """
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req_headers = {":method": "POST", ":path": path, ":scheme": "http", ":authority": "explain",
                   "content-type": "application/json", "content-length": str(len(raw)),
                   EXPLAIN_HEADER: "1", **(headers or {})}
    life = gateway.new_stream()
    try:
        decision = await life.request_headers(req_headers, False)
        if not isinstance(decision, Reply):
            decision = await life.request_body(raw, True)
    finally:
        if life.ctx is not None:
            await life.stream_closed(True)
    ctx = life.ctx
    out = Explanation(status=None, tier=ctx.tier if ctx else None,
                      model=ctx.tier_config.model if ctx and ctx.tier_config else None,
                      reason=ctx.tier_reason if ctx else "", trace=list(ctx.route_trace) if ctx else [],
                      prompt_tokens=ctx.prompt_tokens_estimate if ctx else None,
                      timings_ms=dict(ctx.timings_ms) if ctx else {},
                      degraded=list(ctx.degraded) if ctx else [])
    if isinstance(decision, Reply):
        out.status = decision.status
        try:
            out.error = json.loads(decision.body)
        except ValueError:
            out.error = {"error": {"message": decision.body.decode("utf-8", "replace")}}
    else:
        out.upstream_path = dict(decision.set_headers).get(":path")
    return out


def build_body(prompt: str | None, *, model: str = "auto", body_json: str | None = None,
               system: str | None = None, max_tokens: int | None = None, stream: bool = False) -> dict:
    """The chat request to explain: a JSON body as given, or one user message (and a system one)."""
    if body_json is not None:
        body = json.loads(body_json)
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        return body
    if prompt is None:
        raise ValueError("give a prompt or a request body")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    body: dict = {"model": model, "messages": messages, "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


async def explain(config: GatewayConfig, bodies: list[dict], *, headers: dict[str, str] | None = None,
                  shared_state: bool = False) -> list[Explanation]:
    """Start a gateway for ``config`` (deciding plugins only; isolated state unless ``shared_state``)
    and explain each body."""
    from extproc.framework.gateway import Gateway

    config, left_out = deciding_plugins(config)
    gateway = Gateway(config if shared_state else isolated(config))
    await gateway.start()
    try:
        out = [await explain_request(gateway, body, headers=headers) for body in bodies]
        for e in out:
            e.left_out = left_out
        return out
    finally:
        await gateway.stop()
