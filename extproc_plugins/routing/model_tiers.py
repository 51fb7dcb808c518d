"""Model tiers: a request naming a tier or one of its aliases is pinned to it; ``auto`` gets the default.

This is the last word in tier choice (``trylast``): routing policies configured before it decide
first, and it only resolves what they left open.
"""

from __future__ import annotations

from extproc_plugins.routing import ladder as routing
from extproc.framework.context import TierChoice
from extproc.framework.hookspecs import hookimpl
from extproc.formats.openai import OpenAIError


class ModelTiers:
    """Resolve ``model`` to a tier: pinned names and aliases, ``auto`` to the default tier."""

    def __init__(self) -> None:
        self.tiers = None

    @hookimpl
    def extproc_startup(self, gateway):
        self.tiers = gateway.tiers

    @hookimpl(trylast=True)
    def extproc_choose_tier(self, ctx, candidates):
        model = ctx.request.model
        pinned = self.tiers.resolve(model)
        if pinned is not None:
            if pinned not in candidates:
                routing.trace(ctx, "model_tiers", f"pinned {pinned} is not allowed: 403")
                raise OpenAIError(
                    403, f"The model {model!r} is not allowed for this request.",
                    type="invalid_request_error", param="model", code="model_not_allowed",
                )
            routing.trace(ctx, "model_tiers", f"pinned {pinned}")
            return TierChoice(pinned, "pinned")
        if model == self.tiers.auto_model:
            if self.tiers.default in candidates:
                routing.trace(ctx, "model_tiers", f"nothing decided: default tier {self.tiers.default}")
                return TierChoice(self.tiers.default, "default")
            if candidates:
                routing.trace(ctx, "model_tiers", f"nothing decided, default {self.tiers.default} not allowed: "
                                                  f"{candidates[0]}")
                return TierChoice(candidates[0], "default")
            raise OpenAIError(403, "No model tier is allowed for this request.", param="model",
                              code="model_not_allowed")
        return None  # unknown model: the gateway answers 404 model_not_found
