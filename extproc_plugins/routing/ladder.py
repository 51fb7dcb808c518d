"""What the routing policies share: the tier ladder, the capabilities a request needs, the trace.

Routing policies (``route_rules``, ``semantic_routes``, ``learned_router``, ``load_spill``,
``budget_downgrade`` and ``model_tiers``, all in this package) never import each other; they
cooperate through the request context (``candidates``, ``ctx.route_trace``, ``ctx.over_soft_budget``)
and the helpers here, so that they agree on:

* **the ladder**: tiers from cheapest to strongest (:func:`tier_ladder`). "One tier down", "the
  nearest allowed tier" and "spill to an alternative" are all steps on it;
* **the trace**: every policy appends ``"<plugin>: <what it did>"`` to ``ctx.route_trace``
  (:func:`trace`); ``extproc route --explain`` prints it and metrics count it per plugin.

The text a router judges and its one embedding per request are in
:mod:`extproc.embeddings.prompt`, shared with the semantic cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    from extproc.framework.config import TierConfig
    from extproc.framework.context import RequestContext
    from extproc.framework.gateway import TierRegistry



def tier_ladder(tiers: Mapping[str, "TierConfig"], order: Sequence[str] | None = None) -> list[str]:
    """Tiers from cheapest to strongest.

    :param tiers: the configured tiers (``gateway.tiers.tiers``).
    :param order: an explicit ladder (a policy's ``ladder`` setting); every name must be a tier.
        Without it: by price (completion, then prompt, per 1k tokens), ties in configuration order.
    :raises ValueError: ``order`` names a tier that is not configured, or names one twice.
    """
    if order:
        unknown = [t for t in order if t not in tiers]
        if unknown:
            raise ValueError(f"ladder: unknown tier(s) {', '.join(map(repr, unknown))} "
                             f"(configured: {', '.join(tiers)})")
        if len(set(order)) != len(order):
            raise ValueError("ladder: a tier is listed twice")
        return list(order)
    index = {name: i for i, name in enumerate(tiers)}
    return sorted(tiers, key=lambda n: (tiers[n].price.completion_per_1k, tiers[n].price.prompt_per_1k, index[n]))



def policy_ladder(plugin: str, tiers: Mapping[str, "TierConfig"], order: Sequence[str] | None) -> list[str]:
    """:func:`tier_ladder` for a policy's start-up: a bad ``ladder`` setting is a
    :class:`~extproc.framework.config.ConfigError` naming ``<plugin>.settings.ladder``."""
    from extproc.framework.config import ConfigError

    try:
        return tier_ladder(tiers, order)
    except ValueError as exc:
        raise ConfigError(f"{plugin}.settings.{exc}") from None



def closest_allowed(tier: str, candidates: Sequence[str], ladder: Sequence[str], *,
                    prefer: str = "down") -> str | None:
    """``tier`` if allowed, else the allowed tier nearest to it on the ladder.

    :param prefer: which neighbour wins a tie: ``"down"`` (the cheaper one; the default, because a
        tier is usually removed for cost or permission, and the next stronger one would cost more
        still) or ``"up"`` (the stronger one: quality first).
    :return: None when no candidate is on the ladder.
    """
    if tier in candidates:
        return tier
    if tier not in ladder:
        return None
    pos = ladder.index(tier)
    order = (1, -1) if prefer == "up" else (-1, 1)
    for dist in range(1, len(ladder)):
        for sign in order:
            i = pos + sign * dist
            if 0 <= i < len(ladder) and ladder[i] in candidates:
                return ladder[i]
    return None



def step_down(tier: str, candidates: Sequence[str], ladder: Sequence[str], steps: int = 1,
              floor: str | None = None) -> str:
    """The allowed tier ``steps`` rungs below ``tier`` (skipping tiers not in ``candidates``).

    Never goes below ``floor`` (a tier name) nor below the cheapest allowed tier; returns ``tier``
    itself when there is nothing cheaper that is allowed.
    """
    if tier not in ladder:
        return tier
    lowest = ladder.index(floor) if floor in ladder else 0
    pos, out = ladder.index(tier), tier
    moved = 0
    for i in range(pos - 1, lowest - 1, -1):
        if ladder[i] in candidates:
            out, moved = ladder[i], moved + 1
            if moved == steps:
                break
    return out



def is_auto(registry: "TierRegistry", ctx: "RequestContext") -> bool:
    """Whether the request asked the gateway to choose (``model: auto``)."""
    return ctx.request is not None and ctx.request.model == registry.auto_model



def pinned_tier(registry: "TierRegistry", ctx: "RequestContext") -> str | None:
    """The tier the request's ``model`` names (a tier or an alias), or None."""
    return registry.resolve(ctx.request.model) if ctx.request is not None else None



KNOWN_CAPABILITIES = ("tools", "json_mode", "vision")
"""The capabilities :func:`required_capabilities` infers from a request."""



def required_capabilities(ctx: "RequestContext") -> set[str]:
    """What the request needs of a tier beyond text generation.

    ``tools`` (tools, functions or a tool_choice other than none), ``json_mode`` (a
    ``response_format`` other than text) and ``vision`` (an image content part).
    """
    req = ctx.request
    needs: set[str] = set()
    raw = req.raw if isinstance(req.raw, dict) else {}
    if req.tools or raw.get("functions") or (req.tool_choice not in (None, "none")) \
            or raw.get("function_call") not in (None, "none"):
        needs.add("tools")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        needs.add("json_mode")
    for message in req.messages or ():
        if isinstance(message.content, list) and any(
                isinstance(p, dict) and p.get("type") in ("image_url", "input_image") for p in message.content):
            needs.add("vision")
            break
    return needs



def trace(ctx: "RequestContext", plugin: str, message: str) -> None:
    """Record a routing step: ``"<plugin>: <message>"`` in ``ctx.route_trace``."""
    ctx.route_trace.append(f"{plugin}: {message}")
