"""Metrics: every request's facts become Prometheus metrics (see :mod:`extproc.observability.metrics` for the list).

Runs in ``extproc_request_finished``, after the request ended however it ended; place it last in
the plugin list (so it sees what every other policy recorded) and ``fail_open`` (a metrics bug
must never cost a request). It reads only the shared context fields (usage, cost, cache, budget,
routing, timings...) and the cost split of :class:`extproc.observability.cost_model.CostModel`, and exports the
gateway's plugin failure counts (``HookRunner.failures``).

Label cardinality is bounded: ``tenants`` / ``workflows`` listed in the settings keep their names
(plus the first ``dynamic_labels`` others seen by each worker); every other value is ``other``.
"""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, ConfigDict, Field

from extproc.observability.cost_model import PHASE_PREFIX, PLUGIN_PREFIX
from extproc.framework.hookspecs import hookimpl
from extproc.observability.metrics import BoundedLabel, get_metrics

_COST_KINDS = ("prompt", "completion", "retries", "embeddings", "overhead")


class Metrics:
    """Record each finished request into the process's Prometheus metrics."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tenants: list[str] = Field(default_factory=list, description="tenants labelled by name; others: other")
        workflows: list[str] = Field(default_factory=list, description="workflows labelled by name; others: other")
        dynamic_labels: int = Field(0, ge=0, le=1000, description="also label the first N other tenants and "
                                    "workflows each worker sees")
        max_reasons: int = Field(50, ge=1, le=1000, description="distinct routing reasons labelled per "
                                 "worker; the rest: other")
        max_names: int = Field(100, ge=1, le=1000, description="distinct cache layers/results/statuses, "
                               "budget names and route-step plugins labelled per worker; the rest: other")

    def __init__(self, settings: "Metrics.Settings | None" = None):
        settings = settings or self.Settings()
        self.tenant = BoundedLabel(["anonymous", *settings.tenants], settings.dynamic_labels)
        self.workflow = BoundedLabel(settings.workflows, settings.dynamic_labels)
        self.reason = BoundedLabel((), settings.max_reasons)
        self.name = BoundedLabel((), settings.max_names)  # cache layers/results, budgets, route steps
        self.m = get_metrics()
        self.cost_model = None
        self.hooks = None
        self._failures_seen: Counter = Counter()

    @hookimpl
    def extproc_startup(self, gateway):
        self.cost_model = gateway.cost_model
        self.hooks = gateway.hooks

    @hookimpl
    def extproc_request_finished(self, ctx):
        m, child = self.m, self.m.child
        tenant, workflow, tier = self.tenant(ctx.tenant), self.workflow(ctx.workflow), ctx.tier or "none"
        who = (tenant, workflow, tier)
        if ctx.response_status is not None:
            child(m.responses, (tier, str(ctx.response_status))).inc()

        usage = ctx.usage
        if usage is not None:
            if usage.prompt_tokens:
                child(m.tokens, (*who, "prompt")).inc(usage.prompt_tokens)
            if usage.completion_tokens:
                child(m.tokens, (*who, "completion")).inc(usage.completion_tokens)
        if ctx.tokens_saved:
            child(m.tokens, (*who, "saved")).inc(ctx.tokens_saved)
        if ctx.tokens_cut:
            child(m.tokens, (*who, "cut")).inc(ctx.tokens_cut)
        if self.cost_model is not None:
            cost = self.cost_model.breakdown(ctx)
            for kind in _COST_KINDS:
                value = getattr(cost, kind)
                if value:
                    child(m.cost, (*who, kind)).inc(value)
            if self.cost_model.is_retry(ctx):
                child(m.retries, who).inc()
        if ctx.cost_saved_usd:
            child(m.cost_saved, who).inc(ctx.cost_saved_usd)
        if ctx.embedding_calls:
            child(m.embedding_calls, (tenant, workflow)).inc(ctx.embedding_calls)
        for source in ctx.embedding_sources:
            child(m.embeddings, (source,)).inc()  # a fixed set (extproc.embeddings.prompt)

        if ctx.cache_status:
            child(m.cache_requests, (tier, self.name(ctx.cache_status))).inc()
        for layer, result in ctx.cache_lookups:
            child(m.cache_lookups, (self.name(layer), self.name(result))).inc()
        if ctx.budget_status:
            status, _, budget = ctx.budget_status.partition(":")
            child(m.budget_decisions, (tenant, self.name(status))).inc()
            if status == "rejected":
                child(m.budget_rejections, (tenant, self.name(budget or "none"))).inc()
        if ctx.tier is not None:
            child(m.routing, (tier, self.reason(ctx.tier_reason or "none"))).inc()
        for step in ctx.route_trace:
            child(m.route_steps, (self.name(step.partition(":")[0].strip()),)).inc()
        for plugin in ctx.degraded:
            child(m.degraded, (plugin,)).inc()  # configured plugins

        child(m.request_duration, (tier, ctx.outcome)).observe(ctx.elapsed_ms / 1000.0)
        for key, ms in ctx.timings_ms.items():
            if key.startswith(PHASE_PREFIX):
                child(m.phase_duration, (key[len(PHASE_PREFIX):],)).observe(ms / 1000.0)  # fixed set
            elif key.startswith(PLUGIN_PREFIX):
                child(m.plugin_duration, (key[len(PLUGIN_PREFIX):],)).observe(ms / 1000.0)  # configured
            elif key == "ttft":
                child(m.ttft, (tier, "true" if ctx.stream else "false")).observe(ms / 1000.0)
            elif key == "upstream":
                child(m.upstream_duration, (tier,)).observe(ms / 1000.0)
        if self.hooks is not None and self.hooks.failures != self._failures_seen:
            self._export_failures()
        # Last: a scrape that sees this request counted sees everything else it recorded too.
        child(m.requests, (*who, ctx.outcome)).inc()

    @hookimpl
    def extproc_shutdown(self, gateway):
        self._export_failures()

    def _export_failures(self) -> None:
        """Add plugin failures counted since the last export (``HookRunner.failures``)."""
        if self.hooks is None:
            return
        for (plugin, hook), count in list(self.hooks.failures.items()):
            delta = count - self._failures_seen[(plugin, hook)]
            if delta > 0:
                self.m.child(self.m.plugin_failures, (plugin, hook)).inc(delta)  # configured plugins
                self._failures_seen[(plugin, hook)] = count
