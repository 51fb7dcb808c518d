"""Learned router: a classifier on the prompt's embedding picks the tier, with calibrated thresholds.

The model (:mod:`extproc_plugins.routing.router_model`) is trained with ``extproc router train LABELLED.jsonl``
and judged with ``extproc router eval``; the package ships one trained on its own labelled set
(``extproc_plugins/routing/data/learned_router.json``), so ``auto`` is routed sensibly out of the box.

For each ``auto`` request: the embedding of what the prompt asks (its task text,
:mod:`extproc_plugins.routing.task_text`; shared with the semantic routes: computed once per
request) gives P(tier) -- and the prompt's token count, for a model trained with it; the strongest tier whose cumulative score reaches its
calibrated threshold is chosen (RouteLLM-style: the thresholds were set so that a target share of
traffic reaches the strong tier). If a policy before removed that tier from the candidates, the
nearest allowed tier is taken (the cheaper one on a tie). Pinned requests are left alone.

Settings: ``model_path`` (default: the shipped model), ``tier_map`` (model label -> tier, when the
configured tiers are named differently), ``thresholds`` (override the calibrated ones, e.g.
``{large: 0.3}``), ``ladder``, ``memo_entries`` (decisions remembered per worker, keyed on the
tenant, the task text, the prompt's token count if the model reads it, and the candidates: a
repeated prompt is not embedded again; 0: off; see :mod:`extproc_plugins.routing.route_memo`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from extproc_plugins.routing import ladder as routing
from extproc_plugins.routing.route_memo import DEFAULT_ENTRIES, RouteMemo
from extproc_plugins.routing.task_text import request_task_text, task_embedding
from extproc.embeddings import prompt as prompts
from extproc.framework.config import ConfigError
from extproc.framework.context import TierChoice
from extproc.framework.hookspecs import hookimpl
from extproc_plugins.routing.router_model import RouterDataError, RouterModel, default_model_path

NAME = "learned_router"


class LearnedRouter:
    """Calibrated classifier on embeddings; see the module docstring."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        model_path: str | None = Field(None, description="trained model JSON (default: the shipped one)")
        tier_map: dict[str, str] = Field(default_factory=dict, description="model label -> tier")
        thresholds: dict[str, float] = Field(default_factory=dict, description="label -> threshold override")
        ladder: list[str] | None = None
        memo_entries: int = Field(DEFAULT_ENTRIES, ge=0, description="decisions remembered per worker "
                                  "(tenant, task text, prompt tokens if read, candidates); 0: off (route_memo.py)")

    def __init__(self, settings: "LearnedRouter.Settings | None" = None, *, embedder=None):
        self.settings = settings or self.Settings()
        self.embedder = embedder
        self.registry = None
        self.model: RouterModel | None = None
        self.ladder: list[str] = []
        self.label_tier: dict[str, str] = {}
        self.memo = RouteMemo(NAME, self.settings.memo_entries)

    @hookimpl
    def extproc_startup(self, gateway):
        self.registry = gateway.tiers
        self.memo = RouteMemo(NAME, self.settings.memo_entries)  # never a decision of another configuration
        tiers = gateway.tiers.tiers
        path = self.settings.model_path or default_model_path()
        try:
            self.model = RouterModel.load(path)
            self.ladder = routing.tier_ladder(tiers, self.settings.ladder)
        except (RouterDataError, ValueError) as exc:
            raise ConfigError(f"{NAME}.settings: {exc}") from None
        unknown_labels = [k for k in (*self.settings.tier_map, *self.settings.thresholds)
                          if k not in self.model.labels]
        if unknown_labels:
            raise ConfigError(f"{NAME}.settings: label(s) {', '.join(map(repr, unknown_labels))} are not "
                              f"in the model (labels: {', '.join(self.model.labels)})")
        self.label_tier = {lab: self.settings.tier_map.get(lab, lab) for lab in self.model.labels}
        missing = [t for t in self.label_tier.values() if t not in tiers]
        if missing:
            raise ConfigError(f"{NAME}.settings.tier_map: tier(s) {', '.join(map(repr, missing))} are not "
                              f"configured (configured: {', '.join(tiers)}); map the model's labels to tiers")
        self.model.thresholds.update(self.settings.thresholds)
        self.embedder = self.embedder or prompts.prompt_embedder()
        self.embedder.load()
        prompts.prompt_tokens_ready()

    @hookimpl
    async def extproc_choose_tier(self, ctx, candidates):
        if not routing.is_auto(self.registry, ctx):
            return None
        if self.model is None:
            raise RuntimeError("learned_router has no model: its start-up failed (see the log)")
        tokens = await prompts.prompt_tokens_async(ctx) if self.model.uses_tokens else None
        key = self.memo.key(ctx, request_task_text(ctx), candidates, tokens)
        return await self.memo.decided(ctx, key, lambda: self._decide(ctx, candidates, tokens))

    async def _decide(self, ctx, candidates, tokens: int | None):
        vector = await task_embedding(ctx, self.embedder)
        label, probs = self.model.decide(vector, tokens)
        wanted = self.label_tier[label]
        target = routing.closest_allowed(wanted, candidates, self.ladder)
        shown = ", ".join(f"{lab} {p:.2f}" for lab, p in zip(self.model.labels, probs))
        if target is None:
            routing.trace(ctx, NAME, f"{wanted} not allowed and no alternative (p: {shown}); pass")
            return None
        note = "" if target == wanted else f" (nearest allowed to {wanted})"
        routing.trace(ctx, NAME, f"{target}{note}: p {shown}; thresholds " + ", ".join(
            f"{k} {v:.2f}" for k, v in self.model.thresholds.items()))
        return TierChoice(target, NAME)
