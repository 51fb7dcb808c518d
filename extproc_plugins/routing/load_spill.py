"""Load spill-over: when the chosen tier's Triton queue is deeper than a bound, use another tier.

After the tier is chosen (``extproc_adjust_tier``), the chosen tier's queue depth is read from
Triton's Prometheus metrics (:class:`extproc.observability.triton_metrics.TritonMetricsClient`: one scrape per
``max_age`` seconds per worker, shared by every request in flight). If it is deeper than the
tier's bound (``max_depth``), the request goes to an allowed tier whose own queue is within its
bound: the cheaper tiers first, nearest first, then the stronger ones (``prefer: up`` reverses
that); if every alternative is busy too, the choice stands (spilling would only move the queue).

**Queue depth** is the sum of the ``queue_metrics`` selectors for the tier's model (``models``
maps a tier to the ``model`` label its metrics carry; default: the tier's ``model``). The
defaults cover Triton's scheduler queue (``nv_inference_pending_request_count``) and TensorRT-LLM's
in-flight batcher queue (``nv_trt_llm_request_metrics{request_type="waiting"}``; its label is
the ``tensorrt_llm`` model, so map the tier to it) and the CPU reference tiers' own queue
(``reference_llm_waiting_requests``). Decoupled backends take every request at once, so
``pending`` alone stays at 0 for them: their own gauge is what shows the queue.

**Failures fail open, deliberately**: metrics that cannot be read (Triton down, timeout, bad
text) leave the choice as it is and say so in the trace; the failure is cached for ``max_age`` so
a dead endpoint costs one attempt per period, and the request pays at most ``timeout``.

Pinned requests keep their tier unless ``pinned: true``.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from extproc_plugins.routing import ladder as routing
from extproc.framework.config import ConfigError
from extproc.framework.hookspecs import hookimpl
from extproc.observability.triton_metrics import TritonMetricsClient, TritonMetricsError, parse_selector
from extproc.upstreams.registry import exports_triton_metrics

NAME = "load_spill"
DEFAULT_METRICS_URL = "http://127.0.0.1:8002/metrics"
log = logging.getLogger(__name__)


class LoadSpill:
    """Spill from a tier whose queue is too deep; see the module docstring."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        max_depth: dict[str, int] = Field(default_factory=dict, description="tier -> deepest queue tolerated")
        metrics_url: str | None = Field(None, description="Triton's /metrics (default: server.triton_metrics_url, "
                                                          f"else {DEFAULT_METRICS_URL})")
        metrics_urls: dict[str, str] = Field(default_factory=dict, description="tier -> metrics URL override")
        queue_metrics: list[str] = Field(default_factory=lambda: [
            "nv_inference_pending_request_count",
            'nv_trt_llm_request_metrics{request_type="waiting"}',
            "reference_llm_waiting_requests",  # the CPU reference tiers' own queue
        ])
        models: dict[str, str] = Field(default_factory=dict, description="tier -> model label in the metrics")
        max_age: float = Field(1.0, gt=0, description="seconds a scrape is reused")
        timeout: float = Field(0.25, gt=0, description="seconds a scrape may take")
        prefer: Literal["down", "up"] = "down"
        pinned: bool = Field(False, description="spill pinned requests too")
        ladder: list[str] | None = None

        @field_validator("queue_metrics")
        @classmethod
        def _selectors(cls, selectors: list[str]) -> list[str]:
            if not selectors:
                raise ValueError("at least one queue metric is needed")
            for s in selectors:
                parse_selector(s)
            return selectors

    def __init__(self, settings: "LoadSpill.Settings | None" = None):
        self.settings = settings or self.Settings()
        self.registry = None
        self.ladder: list[str] = []
        self.clients: dict[str, TritonMetricsClient] = {}  # url -> client
        self.tier_url: dict[str, str] = {}
        self.tier_model: dict[str, str] = {}
        self.failures = 0
        self._last_log = 0.0

    @hookimpl
    def extproc_startup(self, gateway):
        s = self.settings
        self.registry = gateway.tiers
        tiers = gateway.tiers.tiers
        self.ladder = routing.policy_ladder(NAME, tiers, s.ladder)
        for key, names in (("max_depth", s.max_depth), ("metrics_urls", s.metrics_urls), ("models", s.models)):
            unknown = [t for t in names if t not in tiers]
            if unknown:
                raise ConfigError(f"{NAME}.settings.{key}: unknown tier(s) {', '.join(map(repr, unknown))}")
        default_url = s.metrics_url or getattr(gateway.config.server, "triton_metrics_url", None) or DEFAULT_METRICS_URL
        for name, tier in tiers.items():
            if not exports_triton_metrics(tier) and name not in s.metrics_urls:
                continue  # e.g. an OpenAI-compatible upstream: no Triton queue, never "too deep"
            url = s.metrics_urls.get(name, default_url)
            self.tier_url[name] = url
            self.tier_model[name] = s.models.get(name, tier.model)
            if url not in self.clients:
                self.clients[url] = TritonMetricsClient(url, timeout=s.timeout, max_age=s.max_age,
                                                        extra=s.queue_metrics)

    async def depth(self, tier: str) -> float | None:
        """The tier's queue depth, or None when it has none to read (not a Triton tier)."""
        url = self.tier_url.get(tier)
        if url is None:
            return None
        loads = await self.clients[url].snapshot()
        load = loads.get(self.tier_model[tier])
        if load is None:
            return 0.0  # the model has not reported yet: nothing queued
        return float(sum(load.extra.get(sel, 0.0) for sel in self.settings.queue_metrics))

    def _too_deep(self, tier: str, depth: float | None) -> bool:
        bound = self.settings.max_depth.get(tier)
        return bound is not None and depth is not None and depth > bound

    @hookimpl
    async def extproc_adjust_tier(self, ctx, choice, candidates):
        tier = choice.tier
        if tier not in self.settings.max_depth:
            return
        if routing.pinned_tier(self.registry, ctx) is not None and not self.settings.pinned:
            return
        try:
            depth = await self.depth(tier)
            if not self._too_deep(tier, depth):
                routing.trace(ctx, NAME, f"{tier} queue {depth:g} <= {self.settings.max_depth[tier]}")
                return
            target, why = await self._alternative(tier, candidates)
        except TritonMetricsError as exc:
            self._failed(exc)
            routing.trace(ctx, NAME, f"metrics unavailable ({exc}); {tier} kept")
            return
        bound = self.settings.max_depth[tier]
        if target is None:
            routing.trace(ctx, NAME, f"{tier} queue {depth:g} > {bound}, but {why}; {tier} kept")
            return
        routing.trace(ctx, NAME, f"{tier} queue {depth:g} > {bound}: spilled to {target} ({why})")
        choice.tier, choice.reason = target, NAME

    async def _alternative(self, tier: str, candidates: list[str]) -> tuple[str | None, str]:
        if tier not in self.ladder:
            return None, "it is not on the ladder"
        pos = self.ladder.index(tier)
        cheaper, stronger = self.ladder[pos - 1::-1] if pos else [], self.ladder[pos + 1:]
        busy = []
        for alt in (cheaper + stronger if self.settings.prefer == "down" else stronger + cheaper):
            if alt not in candidates:
                continue
            depth = await self.depth(alt)
            if not self._too_deep(alt, depth):
                return alt, f"queue {depth:g}" if depth is not None else "no queue to read"
            busy.append(f"{alt} {depth:g}")
        return None, ("every alternative is busy: " + ", ".join(busy)) if busy else "no allowed alternative"

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self._last_log >= 10.0:
            self._last_log = now
            log.warning("load_spill: cannot read Triton metrics (%s); routing ignores load until they are back "
                        "(%d failure(s) so far)", exc, self.failures)
