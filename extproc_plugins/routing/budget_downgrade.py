"""Budget downgrade: a request over its soft budget moves one tier down.

The budget policy marks a request that is over its tenant's *soft* threshold with
``ctx.over_soft_budget = True`` (the hard threshold refuses it there). This policy reads that mark
after the tier is chosen (``extproc_adjust_tier``) and moves the request ``steps`` tiers down the
ladder (cheapest first; tiers not allowed for the request are skipped), never below ``floor``.
The request is still served, just cheaper, and the reason says so (``budget_downgrade``).

Pinned requests (``model: large``) keep their tier unless ``pinned: true``: a client that names a
model gets that model or a refusal, never a silent substitute, by default.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from extproc_plugins.routing import ladder as routing
from extproc.framework.config import ConfigError
from extproc.framework.hookspecs import hookimpl

NAME = "budget_downgrade"


class BudgetDowngrade:
    """Over the soft budget: one tier down; see the module docstring."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        steps: int = Field(1, ge=1, description="tiers to move down")
        floor: str | None = Field(None, description="never below this tier")
        pinned: bool = Field(False, description="downgrade pinned requests too")
        ladder: list[str] | None = None

    def __init__(self, settings: "BudgetDowngrade.Settings | None" = None):
        self.settings = settings or self.Settings()
        self.registry = None
        self.ladder: list[str] = []

    @hookimpl
    def extproc_startup(self, gateway):
        self.registry = gateway.tiers
        self.ladder = routing.policy_ladder(NAME, gateway.tiers.tiers, self.settings.ladder)
        if self.settings.floor is not None and self.settings.floor not in gateway.tiers.tiers:
            raise ConfigError(f"{NAME}.settings.floor: unknown tier {self.settings.floor!r}")

    @hookimpl
    def extproc_adjust_tier(self, ctx, choice, candidates):
        if not ctx.over_soft_budget:
            return
        if routing.pinned_tier(self.registry, ctx) is not None and not self.settings.pinned:
            routing.trace(ctx, NAME, f"over soft budget, but pinned to {choice.tier}: kept")
            return
        lower = routing.step_down(choice.tier, candidates, self.ladder, self.settings.steps, self.settings.floor)
        if lower == choice.tier:
            routing.trace(ctx, NAME, f"over soft budget; {choice.tier} is already the cheapest allowed")
            return
        routing.trace(ctx, NAME, f"over soft budget: {choice.tier} -> {lower}")
        choice.tier, choice.reason = lower, NAME
