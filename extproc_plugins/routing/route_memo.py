"""Remembered routing decisions: a repeated ``auto`` prompt is routed without embedding it again.

The embedding policies (``semantic_routes``, ``learned_router``) are pure functions of what they
read: the task text (:mod:`extproc_plugins.routing.task_text`), for a learned router that reads
it the prompt's token count, and the candidates the policies before them left. Each keeps a small
per-worker LRU of its own decisions keyed on exactly those inputs plus the tenant, so a repeat of a
request -- the common case for an exact-cache hit -- gets the same tier (or the same "pass")
without the embedding, the vector search or the classifier. The exact cache, looked up once the
tier is chosen, then hits as for a pinned request.

What a remembered decision does not change:

* **determinism**: the value is what the policy decided for the same inputs; the policy's settings
  (examples, thresholds, model) are fixed for the life of the worker, and ``extproc_startup``
  starts with an empty memo, so a configuration change (a restart) never sees an old decision;
* **tenancy**: the tenant is part of the key, so one tenant's traffic never warms, evicts or
  times another's (only a decision is remembered, never an answer);
* **everything else**: the policies before the embedding ones (``route_rules``: capabilities,
  deny/allow, rules) and after them (``budget_downgrade``, ``load_spill``, ``model_tiers``) run
  on every request; the caches' TTLs and ``cache-control`` apply as before.

Memory: ``memo_entries`` decisions per policy per worker (default 4096; 0 turns it off), each a
tuple of the tenant, a 16-byte digest of the task text, the candidates and the decision: about
0.3 KB, ~1.3 MB at the default. A hit is traced as ``route_memo: <policy> ...`` in
``ctx.route_trace`` (``extproc_route_steps_total{plugin="route_memo"}``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from extproc.framework.context import TierChoice
from extproc_plugins.routing import ladder as routing

if TYPE_CHECKING:
    from extproc.framework.context import RequestContext

NAME = "route_memo"

#: Decisions each embedding policy remembers per worker by default.
DEFAULT_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class Decision:
    """What a policy decided: a tier and reason, or None (it passed), and its trace line."""

    tier: str | None
    reason: str | None
    note: str


def text_digest(text: str) -> bytes:
    """A 128-bit digest of a route text (the key holds this, not the text: bounded memory)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class RouteMemo:
    """A bounded LRU of one policy's decisions (per worker; see the module docstring)."""

    def __init__(self, policy: str, max_entries: int = DEFAULT_ENTRIES):
        self.policy = policy
        self.max_entries = max_entries
        self._data: OrderedDict[tuple, Decision] = OrderedDict()
        self.hits = self.misses = 0

    def key(self, ctx: "RequestContext", text: str, candidates: list[str], *extra) -> tuple | None:
        """The key of this request's decision (None when the memo is off)."""
        if self.max_entries <= 0:
            return None
        return (ctx.tenant, text_digest(text), tuple(candidates), *extra)

    def recall(self, ctx: "RequestContext", key: tuple | None) -> tuple[bool, TierChoice | None]:
        """``(found, choice)``: a remembered decision replayed (traced), or ``(False, None)``."""
        if key is None:
            return False, None
        decision = self._data.get(key)
        if decision is None:
            self.misses += 1
            return False, None
        self._data.move_to_end(key)
        self.hits += 1
        routing.trace(ctx, NAME, f"{self.policy} {decision.note} (remembered)")
        if decision.tier is None:
            return True, None
        return True, TierChoice(decision.tier, decision.reason)  # a new one: adjusters change it in place

    async def decided(self, ctx: "RequestContext", key: tuple | None,
                      decide: Callable[[], Awaitable[TierChoice | None]]) -> TierChoice | None:
        """The decision remembered for ``key``, else ``await decide()``'s, remembered with the
        trace lines it added (replayed on a later :meth:`recall`)."""
        found, choice = self.recall(ctx, key)
        if found:
            return choice
        steps = len(ctx.route_trace)
        choice = await decide()
        note = "; ".join(step.partition(": ")[2] for step in ctx.route_trace[steps:]) or "pass"
        self.remember(key, choice, note)
        return choice

    def remember(self, key: tuple | None, choice: TierChoice | None, note: str) -> None:
        if key is None:
            return
        self._data[key] = Decision(choice.tier if choice else None, choice.reason if choice else None, note)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
