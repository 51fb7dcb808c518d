"""Route rules: tiers by YAML rules (prompt size, patterns, tenant, workflow) and by what a request needs.

Two jobs, in this order, for every request:

1. **Capabilities and context** (``capabilities: true``): a request routed with ``model: auto``
   that needs ``tools``, ``json_mode`` or ``vision`` keeps only the tiers listing that capability
   (``tiers.<name>.capabilities``), and only tiers whose ``context_window`` holds its prompt plus
   its completion budget. If no tier is left the request gets **400** ``no_capable_tier`` (naming
   what it needs), instead of reaching a model that would refuse or truncate it. A pinned request
   is not checked here: pinned means pinned; the upstream answers for itself.
2. **Rules, first match wins** for deciding; every matching rule narrows. A rule's ``when`` holds
   conditions that must all be true (none: always). Its action is one or more of
   ``deny: [tiers]`` / ``allow: [tiers]`` / ``require: [capabilities]`` (narrow the candidates, for
   every request; ``require`` keeps the tiers whose ``capabilities`` list them all) and
   ``tier: <name>`` (decide, for ``auto`` requests; the first matching rule with a tier decides).

   A pinned request for a tier a rule removed is refused with **403** ``model_not_allowed`` by
   ``model_tiers`` (``pinned: refuse``, the default), or rerouted to the nearest allowed tier
   below it (``pinned: reroute``), with the reason ``route_rules:<rule>``.

Conditions: ``min_prompt_tokens`` / ``max_prompt_tokens`` (the whole prompt, cl100k, inclusive),
``patterns`` (regular expressions, any may match, searched in the last user message, case
insensitive unless the pattern says otherwise; operators' patterns, applied to at most
``max_scan_chars`` characters so a huge prompt costs a bounded time), ``tenants`` and
``workflows`` (``ctx.tenant`` / ``ctx.workflow``, set by an authentication policy), ``endpoints``
(``chat`` / ``completions``) and ``stream``.

Example::

    - name: route_rules
      settings:
        rules:
          - {name: free_plan, when: {tenants: [free]}, deny: [large]}
          - {name: legal, when: {workflows: [contracts]}, require: [long_context]}
          - {name: batch_jobs, when: {workflows: [nightly-batch]}, tier: small}
          - {name: code, when: {patterns: ['```', '\\bdef \\w+\\(', 'stack ?trace']}, tier: large}
          - {name: long_prompt, when: {min_prompt_tokens: 1500}, tier: large}
"""

from __future__ import annotations

import logging
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from extproc_plugins.routing import ladder as routing
from extproc.embeddings import prompt as prompts
from extproc.framework.config import ConfigError
from extproc.framework.context import TierChoice
from extproc.framework.hookspecs import hookimpl
from extproc.formats.openai import OpenAIError

NAME = "route_rules"
log = logging.getLogger(__name__)


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_prompt_tokens: int | None = Field(None, ge=0)
    max_prompt_tokens: int | None = Field(None, ge=0)
    patterns: list[str] = Field(default_factory=list)
    tenants: list[str] | None = None
    workflows: list[str] | None = None
    endpoints: list[Literal["chat", "completions"]] | None = None
    stream: bool | None = None

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"pattern {p!r} is not a valid regular expression: {exc}") from None
        return patterns


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="shown in reasons and traces")
    when: Condition = Field(default_factory=Condition)
    tier: str | None = Field(None, description="decide this tier for auto requests")
    allow: list[str] | None = Field(None, description="keep only these tiers")
    deny: list[str] = Field(default_factory=list, description="remove these tiers")
    require: list[str] = Field(default_factory=list,
                               description="keep only tiers listing all these capabilities (tiers.<t>.capabilities)")
    pinned: Literal["refuse", "reroute"] = Field(
        "refuse", description="a pinned request for a removed tier: 403, or the nearest allowed tier below")

    @model_validator(mode="after")
    def _does_something(self) -> "Rule":
        if self.tier is None and self.allow is None and not self.deny and not self.require:
            raise ValueError(f"rule {self.name!r} has no action (tier, allow, deny or require)")
        return self


class RouteRules:
    """Capability/context narrowing and YAML rules; see the module docstring."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        rules: list[Rule] = Field(default_factory=list)
        capabilities: bool = Field(True, description="narrow auto requests to tiers able to serve them")
        ladder: list[str] | None = Field(None, description="tiers cheapest first (default: by price)")
        max_scan_chars: int = Field(20_000, gt=0, description="characters of the prompt patterns look at")

        @model_validator(mode="after")
        def _unique_names(self) -> "RouteRules.Settings":
            names = [r.name for r in self.rules]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"rule name(s) used twice: {', '.join(dupes)}")
            return self

    def __init__(self, settings: "RouteRules.Settings | None" = None):
        self.settings = settings or self.Settings()
        self.registry = None
        self.ladder: list[str] = []
        self._rules_count_tokens = any(r.when.min_prompt_tokens is not None or r.when.max_prompt_tokens is not None
                                       for r in self.settings.rules)
        self._counts_tokens = self.settings.capabilities or self._rules_count_tokens
        self._patterns = [
            [re.compile(p if p.startswith("(?") else "(?i)" + p) for p in rule.when.patterns]
            for rule in self.settings.rules
        ]

    @hookimpl
    def extproc_startup(self, gateway):
        self.registry = gateway.tiers
        tiers = gateway.tiers.tiers
        self.ladder = routing.policy_ladder(NAME, tiers, self.settings.ladder)
        prompts.prompt_tokens_ready()
        checked = set(routing.KNOWN_CAPABILITIES).union(*(r.require for r in self.settings.rules))
        for name, tier in tiers.items():
            unchecked = sorted(set(tier.capabilities) - checked)
            if unchecked:
                log.warning("tiers.%s.capabilities: %s: no request or rule asks for it (inferred: %s)",
                            name, ", ".join(unchecked), ", ".join(routing.KNOWN_CAPABILITIES))
        for rule in self.settings.rules:
            named = [rule.tier] if rule.tier else []
            named += (rule.allow or []) + rule.deny
            unknown = [t for t in named if t not in tiers]
            if unknown:
                raise ConfigError(f"{NAME}.settings.rules[{rule.name}]: unknown tier(s) "
                                  f"{', '.join(map(repr, unknown))} (configured: {', '.join(tiers)})")

    @hookimpl
    async def extproc_choose_tier(self, ctx, candidates):
        if self._counts_tokens and (routing.is_auto(self.registry, ctx) or self._rules_count_tokens):
            await prompts.prompt_tokens_async(ctx)  # once, off the loop when the prompt is large
        return self._choose(ctx, candidates)

    def _choose(self, ctx, candidates: list[str]):
        auto = routing.is_auto(self.registry, ctx)
        if auto and self.settings.capabilities:
            self._narrow_to_capable(ctx, candidates)
        decision: TierChoice | None = None
        pinned = routing.pinned_tier(self.registry, ctx)
        text: str | None = None
        for rule, patterns in zip(self.settings.rules, self._patterns):
            if patterns and text is None:
                text = prompts.route_text(ctx, self.settings.max_scan_chars)
            if not self._matches(rule, patterns, ctx, text):
                continue
            before = list(candidates)
            if rule.allow is not None:
                candidates[:] = [t for t in candidates if t in rule.allow]
            if rule.deny:
                candidates[:] = [t for t in candidates if t not in rule.deny]
            if rule.require:
                tiers = self.registry.tiers
                candidates[:] = [t for t in candidates if set(rule.require) <= set(tiers[t].capabilities)]
            removed = [t for t in before if t not in candidates]
            if removed:
                routing.trace(ctx, NAME, f"rule {rule.name} removed {', '.join(removed)}")
            if pinned is not None and pinned in removed and decision is None:
                if rule.pinned == "reroute":
                    target = routing.closest_allowed(pinned, candidates, self.ladder, prefer="down")
                    if target is not None:
                        routing.trace(ctx, NAME, f"rule {rule.name}: pinned {pinned} not allowed, rerouted to {target}")
                        decision = TierChoice(target, f"{NAME}:{rule.name}")
                else:
                    routing.trace(ctx, NAME, f"rule {rule.name}: pinned {pinned} not allowed")
            if auto and rule.tier is not None and decision is None:
                target = routing.closest_allowed(rule.tier, candidates, self.ladder)
                if target is not None:
                    note = "" if target == rule.tier else f" (nearest allowed to {rule.tier})"
                    routing.trace(ctx, NAME, f"rule {rule.name} matched: {target}{note}")
                    decision = TierChoice(target, f"{NAME}:{rule.name}")
        return decision

    def _matches(self, rule: Rule, patterns: list[re.Pattern], ctx, text: str | None) -> bool:
        w = rule.when
        if w.tenants is not None and ctx.tenant not in w.tenants:
            return False
        if w.workflows is not None and ctx.workflow not in w.workflows:
            return False
        if w.endpoints is not None and ctx.endpoint not in w.endpoints:
            return False
        if w.stream is not None and ctx.stream != w.stream:
            return False
        if w.min_prompt_tokens is not None or w.max_prompt_tokens is not None:
            n = prompts.prompt_tokens(ctx)
            if w.min_prompt_tokens is not None and n < w.min_prompt_tokens:
                return False
            if w.max_prompt_tokens is not None and n > w.max_prompt_tokens:
                return False
        if patterns and not any(p.search(text or "") for p in patterns):
            return False
        return True

    def _narrow_to_capable(self, ctx, candidates: list[str]) -> None:
        tiers = self.registry.tiers
        needs = routing.required_capabilities(ctx)
        prompt = prompts.prompt_tokens(ctx)
        removed: dict[str, str] = {}
        for name in list(candidates):
            tier = tiers[name]
            missing = needs.difference(tier.capabilities)
            budget = prompt + (ctx.request.max_tokens or tier.default_max_tokens)
            if missing:
                removed[name] = "no " + ", ".join(sorted(missing))
            elif budget > tier.context_window:
                removed[name] = f"context {budget} > {tier.context_window}"
        if not removed:
            return
        candidates[:] = [t for t in candidates if t not in removed]
        routing.trace(ctx, NAME, "not capable: " + "; ".join(f"{t} ({why})" for t, why in removed.items()))
        if not candidates:
            detail = "; ".join(f"{t}: {why}" for t, why in removed.items())
            if needs:
                param = "tools" if "tools" in needs else ("response_format" if "json_mode" in needs else "messages")
                raise OpenAIError(400, f"No model tier can serve this request, which needs "
                                  f"{', '.join(sorted(needs))} ({detail}).", type="invalid_request_error",
                                  param=param, code="no_capable_tier")
            raise OpenAIError(400, f"This request's prompt ({prompt} tokens) and completion budget exceed the "
                              f"context window of every model tier ({detail}).", type="invalid_request_error",
                              param="messages", code="context_length_exceeded")
