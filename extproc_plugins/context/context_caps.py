"""Context caps: a hard cap on prompt tokens and on ``max_tokens``, per tier, route, workflow and tenant.

Rules are tried in order; the **first** whose matchers all match applies (an empty matcher matches
anything). A request's tier is the one it pins (``model: small``), or the default tier for ``auto``
(routing happens later; this plugin then removes from the candidates every tier whose
``context_window`` cannot hold the capped prompt plus ``max_tokens``, so list it before routing).

Prompt tokens are counted with the tier's tokenizer the way the chat format does
(:func:`extproc.formats.tokens.count_chat`) and recorded in ``ctx.prompt_tokens_estimate``. Over the cap,
the rule's ``strategy``:

* ``reject``: 400 ``context_length_exceeded`` (OpenAI's code), nothing sent upstream;
* ``drop_oldest``: drop the oldest turns (a user message and the replies after it), keeping every
  system/developer message and the last user message; if that is still too long, trim the middle;
* ``trim_middle``: cut the middle out of the longest messages (head and tail kept, a marker saying
  how many tokens went), longest first, until the prompt fits.

``max_tokens`` over the rule's cap: clamped (``reject``: 400 on ``max_tokens``). With
``fit_context_window`` the prompt cap is also at most the tier's ``context_window - max_tokens``.
What was cut goes to ``ctx.tokens_cut`` (metrics read it), ``x-extproc-tokens-cut`` and
``ctx.route_trace``.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from extproc.formats import tokens
from extproc.framework.hookspecs import hookimpl
from extproc.formats.openai import OpenAIError

NAME = "context_caps"
Strategy = Literal["reject", "drop_oldest", "trim_middle"]
KEEP_ROLES = ("system", "developer")
MIN_KEEP = 8  # tokens left of a trimmed message, at least
THREAD_CHARS = 64 * 1024  # prompts larger than this are counted and cut in a thread


def _size(req) -> int:
    if req.messages is None:
        return len(req.prompt or "")
    return sum(len(m.content) if isinstance(m.content, str) else len(m.text) for m in req.messages)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tiers: list[str] = Field(default_factory=list)
    routes: list[str] = Field(default_factory=list, description="request paths, e.g. /v1/chat/completions")
    workflows: list[str] = Field(default_factory=list)
    tenants: list[str] = Field(default_factory=list)
    max_prompt_tokens: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    strategy: Strategy = "reject"

    def matches(self, tier: str, route: str, workflow: str | None, tenant: str) -> bool:
        return ((not self.tiers or tier in self.tiers) and (not self.routes or route in self.routes)
                and (not self.workflows or workflow in self.workflows)
                and (not self.tenants or tenant in self.tenants))


# text of a message, whether its content is a string or a list of parts --------------------------
def _text_slots(message) -> list[tuple[object, object]]:
    """(container, index) of each text string of a message: its content, or its text parts."""
    c = message.content
    if isinstance(c, str):
        return [(message, None)]
    if isinstance(c, list):
        return [(p, "text") for p in c if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]
    return []


def _get(slot) -> str:
    obj, key = slot
    return obj.content if key is None else obj[key]


def _set(slot, text: str) -> None:
    obj, key = slot
    if key is None:
        obj.content = text
    else:
        obj[key] = text


def trim_text(text: str, keep: int, encoding: str, marker: str, ids: list[int] | None = None) -> str:
    """``text`` cut to about ``keep`` tokens: head and tail kept, the middle replaced by ``marker``."""
    enc = tokens.get_encoding(encoding)
    if ids is None:
        ids = enc.encode_ordinary(text)
    if len(ids) <= keep:
        return text
    keep = max(0, keep)
    head = keep // 2
    tail = keep - head
    cut = len(ids) - keep
    return (enc.decode(ids[:head]) + marker.format(n=cut) + (enc.decode(ids[-tail:]) if tail else ""))


class ContextCaps:
    """Cap prompt tokens and max_tokens; reject, drop oldest turns or trim the middle."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        rules: list[Rule] = Field(default_factory=list)
        fit_context_window: bool = Field(True, description="also keep prompt + max_tokens within the tier's context_window")
        default_strategy: Strategy = Field("reject", description="for the context window when no rule matched")
        trim_marker: str = "\n[... {n} tokens cut ...]\n"

    def __init__(self, settings: "ContextCaps.Settings"):
        self.settings = settings
        self.gateway = None
        self._big = asyncio.Semaphore(2)

    @hookimpl
    def extproc_startup(self, gateway):
        self.gateway = gateway
        tiers = set(gateway.tiers.tiers)
        for i, rule in enumerate(self.settings.rules):
            unknown = set(rule.tiers) - tiers
            if unknown:
                raise ValueError(f"context_caps: rules[{i}].tiers: unknown tier(s) {', '.join(sorted(unknown))}")

    @hookimpl
    async def extproc_request_parsed(self, ctx):
        # (its time is in ctx.timings_ms["plugin:context_caps"]: the plugin manager times every hook)
        if _size(ctx.request) > THREAD_CHARS:  # tiktoken releases the GIL: keep the loop serving
            async with self._big:  # at most two big prompts at once (CPU-bound), the rest queue
                await asyncio.to_thread(self._cap, ctx)
        else:
            self._cap(ctx)

    def _cap(self, ctx) -> None:
        req = ctx.request
        tiers = self.gateway.tiers
        tier_name = tiers.resolve(req.model) or tiers.default
        tier = tiers.tiers[tier_name]
        rule = next((r for r in self.settings.rules
                     if r.matches(tier_name, ctx.path, ctx.workflow, ctx.tenant)), None)
        strategy = rule.strategy if rule is not None else self.settings.default_strategy

        max_tokens = req.max_tokens or tier.default_max_tokens
        if rule is not None and rule.max_tokens is not None and max_tokens > rule.max_tokens:
            if strategy == "reject" and req.max_tokens is not None:
                raise OpenAIError(
                    400, f"max_tokens is too large: {req.max_tokens}. This route supports at most "
                    f"{rule.max_tokens} completion tokens.", param="max_tokens", code="integer_above_max_value")
            req.max_tokens = max_tokens = rule.max_tokens
            ctx.route_trace.append(f"{NAME}: max_tokens capped to {max_tokens}")

        cap = rule.max_prompt_tokens if rule is not None else None
        if self.settings.fit_context_window:
            window_cap = max(1, tier.context_window - max_tokens)
            cap = window_cap if cap is None else min(cap, window_cap)

        encoding = tier.tokenizer
        count = self._count(req, encoding)
        ctx.prompt_tokens_estimate = count
        if cap is None or count <= cap:
            return
        if strategy == "reject":
            raise OpenAIError(
                400, f"This model's maximum context length is {cap} tokens. However, your "
                f"{'messages' if req.messages is not None else 'prompt'} resulted in {count} tokens. "
                "Please reduce the length of the messages.",
                param="messages" if req.messages is not None else "prompt", code="context_length_exceeded")
        if req.messages is None:
            req.prompt = trim_text(req.prompt or "", max(MIN_KEEP, cap - 16), encoding, self.settings.trim_marker)
        else:
            if strategy == "drop_oldest":
                self._drop_oldest(req, cap, encoding)
            remaining = self._count(req, encoding) if strategy == "drop_oldest" else count
            if remaining > cap:
                self._trim_middle(req, cap, encoding, remaining)
        after = self._count(req, encoding)
        cut = count - after
        ctx.prompt_tokens_estimate = after
        ctx.tokens_cut += cut
        ctx.response_headers["x-extproc-tokens-cut"] = str(ctx.tokens_cut)
        ctx.route_trace.append(f"{NAME}: {strategy} cut {cut} prompt tokens ({count} -> {after}, cap {cap})")

    @staticmethod
    def _count(req, encoding: str) -> int:
        if req.messages is not None:
            return tokens.count_chat(req.messages, encoding)
        return tokens.count_text(req.prompt or "", encoding)

    @staticmethod
    def _drop_oldest(req, cap: int, encoding: str) -> None:
        messages = req.messages
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=len(messages) - 1)
        # turns before the last user message: a user message and the replies after it. Everything
        # from the last user message on (tool calls and their results included) is kept.
        turns: list[list[int]] = []
        for i, m in enumerate(messages[:last_user]):
            if m.role in KEEP_ROLES:
                continue
            if m.role == "user" or not turns:
                turns.append([i])
            else:
                turns[-1].append(i)
        sizes = [tokens.count_chat([m], encoding) - tokens.REPLY_PRIMING for m in messages]
        total = tokens.REPLY_PRIMING + sum(sizes)
        dropped: set[int] = set()
        for turn in turns:
            if total <= cap:
                break
            for i in turn:
                dropped.add(i)
                total -= sizes[i]
        req.messages = [m for i, m in enumerate(messages) if i not in dropped]

    def _trim_middle(self, req, cap: int, encoding: str, total: int | None = None) -> None:
        enc = tokens.get_encoding(encoding)
        marker = self.settings.trim_marker
        marker_tokens = tokens.count_text(marker.format(n=99999), encoding)
        total = tokens.count_chat(req.messages, encoding) if total is None else total
        for _ in range(16):  # each pass trims the longest text; one or two passes in practice
            excess = total - cap
            if excess <= 0:
                return
            slots = [s for m in req.messages for s in _text_slots(m)]
            if not slots:
                return
            encoded = [enc.encode_ordinary(_get(s)) for s in slots]
            n = max(range(len(slots)), key=lambda i: len(encoded[i]))
            size = len(encoded[n])
            if size <= MIN_KEEP + marker_tokens:
                return  # nothing long enough is left to trim
            keep = max(MIN_KEEP, size - excess - marker_tokens - 2)
            _set(slots[n], trim_text(_get(slots[n]), keep, encoding, marker, ids=encoded[n]))
            total = tokens.count_chat(req.messages, encoding)

    @hookimpl
    def extproc_choose_tier(self, ctx, candidates):
        if not self.settings.fit_context_window or ctx.prompt_tokens_estimate is None:
            return None
        tiers = self.gateway.tiers.tiers
        req = ctx.request
        fits = [c for c in candidates
                if ctx.prompt_tokens_estimate + (req.max_tokens or tiers[c].default_max_tokens) <= tiers[c].context_window]
        if fits and len(fits) < len(candidates):
            removed = [c for c in candidates if c not in fits]
            candidates[:] = fits
            ctx.route_trace.append(f"{NAME}: removed tier(s) {', '.join(removed)} (context window too small)")
        return None
