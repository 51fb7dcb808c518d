"""Semantic routes: example utterances per tier; a prompt close enough to a tier's examples goes there.

At start-up every example utterance is embedded (all-MiniLM-L6-v2, in NumPy; ~100 utterances
take well under a second). For each ``auto`` request what the prompt asks (the last user message,
or a long one's instruction without its attached material: :mod:`extproc_plugins.routing.task_text`)
is embedded once -- shared with the learned router -- and compared (cosine similarity) with every
example:

* the ``k`` nearest examples at or above ``threshold`` vote for their tier, each with its
  similarity; the tier with the most weight wins (the nearest allowed one if a policy before
  removed it from the candidates);
* if no example reaches ``threshold``: ``default_tier`` when set, else the policy passes and the
  next one decides (in the default chain: the learned router).

Examples come from ``routes`` (inline, ``{tier: [utterances]}``) or ``routes_file`` (a YAML file of
the same shape); neither: the examples shipped in ``extproc_plugins/routing/data/route_utterances.yaml``.
Pinned requests are left alone.

A repeated prompt is not embedded again: each decision (a tier, or a pass) is remembered per worker,
keyed on the tenant, the task text and the candidates (``memo_entries``, see
:mod:`extproc_plugins.routing.route_memo`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from extproc_plugins.routing import ladder as routing
from extproc_plugins.routing.route_memo import DEFAULT_ENTRIES, RouteMemo
from extproc_plugins.routing.task_text import request_task_text, task_embedding
from extproc.embeddings import prompt as prompts
from extproc.framework.config import ConfigError
from extproc.framework.context import TierChoice
from extproc.framework.hookspecs import hookimpl

NAME = "semantic_routes"


def default_routes_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("extproc_plugins.routing").joinpath("data", "route_utterances.yaml")))


class SemanticRoutes:
    """Nearest example utterances decide the tier; see the module docstring."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        routes: dict[str, list[str]] | None = Field(None, description="tier -> example utterances")
        routes_file: str | None = Field(None, description="YAML file of tier -> example utterances")
        threshold: float = Field(0.5, ge=-1.0, le=1.0, description="minimum cosine similarity")
        k: int = Field(3, ge=1, le=50, description="nearest examples that vote")
        default_tier: str | None = Field(None, description="when nothing is close enough (None: pass)")
        ladder: list[str] | None = None
        memo_entries: int = Field(DEFAULT_ENTRIES, ge=0, description="decisions remembered per worker "
                                  "(tenant, task text, candidates); 0: off (route_memo.py)")

    def __init__(self, settings: "SemanticRoutes.Settings | None" = None, *, embedder=None):
        self.settings = settings or self.Settings()
        self.embedder = embedder
        self.registry = None
        self.ladder: list[str] = []
        self.examples: list[str] = []
        self.example_tiers: np.ndarray = np.zeros(0, dtype=object)
        self.matrix: np.ndarray = np.zeros((0, 384), np.float32)
        self.memo = RouteMemo(NAME, self.settings.memo_entries)

    def _routes(self) -> tuple[dict, str]:
        s = self.settings
        if s.routes is not None and s.routes_file is not None:
            raise ConfigError(f"{NAME}.settings: give routes or routes_file, not both")
        if s.routes is not None:
            return s.routes, f"{NAME}.settings.routes"
        path = Path(s.routes_file) if s.routes_file else default_routes_path()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{NAME}.settings.routes_file: cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{NAME}.settings.routes_file: {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict) or not all(
                isinstance(v, list) and all(isinstance(u, str) for u in v) for v in data.values()):
            raise ConfigError(f"{NAME}.settings.routes_file: {path} must map each tier to a list of utterances")
        return data, str(path)

    @hookimpl
    async def extproc_startup(self, gateway):
        self.registry = gateway.tiers
        self.memo = RouteMemo(NAME, self.settings.memo_entries)  # never a decision of another configuration
        tiers = gateway.tiers.tiers
        self.ladder = routing.policy_ladder(NAME, tiers, self.settings.ladder)
        routes, source = self._routes()
        unknown = [t for t in routes if t not in tiers]
        if self.settings.default_tier is not None and self.settings.default_tier not in tiers:
            unknown.append(self.settings.default_tier)
        if unknown:
            raise ConfigError(f"{source}: unknown tier(s) {', '.join(map(repr, unknown))} "
                              f"(configured: {', '.join(tiers)})")
        self.examples = [u.strip() for t in routes for u in routes[t] if u.strip()]
        self.example_tiers = np.array([t for t in routes for u in routes[t] if u.strip()], dtype=object)
        if not self.examples:
            raise ConfigError(f"{source}: no example utterances")
        self.embedder = self.embedder or prompts.prompt_embedder()
        self.matrix = np.ascontiguousarray(await self.embedder.embed_many(self.examples), dtype=np.float32)

    @hookimpl
    async def extproc_choose_tier(self, ctx, candidates):
        if not routing.is_auto(self.registry, ctx):
            return None
        if not self.examples:
            raise RuntimeError("semantic_routes has no examples: its start-up failed (see the log)")
        async def decide():
            return self._decide(ctx, candidates, await task_embedding(ctx, self.embedder))

        key = self.memo.key(ctx, request_task_text(ctx), candidates)
        return await self.memo.decided(ctx, key, decide)

    def nearest(self, vector: np.ndarray) -> list[tuple[float, str, str]]:
        """``(similarity, tier, example)`` of the ``k`` nearest examples, best first."""
        sims = self.matrix @ np.asarray(vector, dtype=np.float32)
        k = min(self.settings.k, len(sims))
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top])]
        return [(float(sims[i]), str(self.example_tiers[i]), self.examples[i]) for i in top]

    def _decide(self, ctx, candidates: list[str], vector: np.ndarray):
        near = self.nearest(vector)
        close = [(s, t, e) for s, t, e in near if s >= self.settings.threshold]
        if not close:
            best = near[0]
            if self.settings.default_tier is None:
                routing.trace(ctx, NAME, f"nothing close enough (best {best[0]:.2f} {best[1]} "
                                         f"< {self.settings.threshold:.2f}); pass")
                return None
            target = routing.closest_allowed(self.settings.default_tier, candidates, self.ladder)
            if target is None:
                return None
            routing.trace(ctx, NAME, f"nothing close enough (best {best[0]:.2f} < {self.settings.threshold:.2f}); "
                                     f"default {target}")
            return TierChoice(target, f"{NAME}:default")
        votes: dict[str, float] = {}
        for s, t, _ in close:
            votes[t] = votes.get(t, 0.0) + s
        winner = max(votes, key=lambda t: (votes[t], self.ladder.index(t) if t in self.ladder else -1))
        target = routing.closest_allowed(winner, candidates, self.ladder)
        if target is None:
            return None
        s, t, example = close[0]
        note = "" if target == winner else f" (nearest allowed to {winner})"
        routing.trace(ctx, NAME, f"{target}{note}: nearest {t} example {example[:60]!r} at {s:.2f}, "
                                 f"votes " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(votes.items())))
        return TierChoice(target, NAME)
