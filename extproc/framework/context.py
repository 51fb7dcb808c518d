"""The per-request context that every hook receives, and the small types hooks exchange."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from extproc.upstreams.base import UpstreamRequest  # noqa: F401 (re-exported: extproc_before_upstream receives it)

if TYPE_CHECKING:
    from extproc.framework.config import TierConfig
    from extproc.formats.openai import OpenAIRequest, Usage

Outcome = Literal["pending", "completed", "replied", "aborted", "failed"]


@dataclass(slots=True)
class TierChoice:
    """A routing decision: the tier, and why (shown in ``x-extproc-tier-reason``)."""

    tier: str
    reason: str = ""


@dataclass(slots=True)
class ResponseChunk:
    """One piece of the answer on its way to the client."""

    text: str
    data: bytes
    index: int


@dataclass(slots=True)
class RequestContext:
    """Everything known about one request, carried through every hook.

    Plugins read what earlier phases set and write what later ones (or later plugins) need; a
    plugin keeps its own per-request data in ``ctx.plugin_state[<its name>]``.
    """

    request_id: str
    method: str
    path: str
    headers: dict[str, str]
    endpoint: Literal["chat", "completions"] | None = None
    request: "OpenAIRequest | None" = None
    tenant: str = "anonymous"
    workflow: str | None = None
    tier: str | None = None
    tier_config: "TierConfig | None" = None
    tier_reason: str = ""
    prompt_tokens_estimate: int | None = None
    usage: "Usage | None" = None
    cost_usd: float | None = None
    response_status: int | None = None
    outcome: Outcome = "pending"
    error: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    plugin_state: dict[str, Any] = field(default_factory=dict)
    # Facts policies record for each other and for metrics / usage records (they cooperate
    # through these fields, never by importing each other):
    api_key_id: str | None = None
    cache_status: str | None = None  # "hit", "semantic_hit", "coalesced", "idempotent", "miss", "bypass"
    cache_lookups: list[tuple[str, str]] = field(default_factory=list)  # (layer, result) per lookup
    tokens_saved: int = 0  # tokens not generated upstream thanks to a cache/coalescing
    cost_saved_usd: float = 0.0
    tokens_cut: int = 0  # prompt tokens removed by context caps / retrieval discipline
    budget_status: str | None = None  # e.g. "ok", "soft_limit", "rejected:<budget name>"
    over_soft_budget: bool = False  # set by the budget policy; routing may downgrade the tier
    route_trace: list[str] = field(default_factory=list)  # "<plugin>: <what it did>" in order
    embedding_calls: int = 0
    embedding_sources: list[str] = field(default_factory=list)  # where each was computed: local, triton, local_fallback
    timings_ms: dict[str, float] = field(default_factory=dict)  # phase or plugin -> milliseconds
    started: float = field(default_factory=time.perf_counter)
    upstream_sent_at: float | None = None  # perf_counter() when the request went upstream
    first_byte_at: float | None = None
    finished_at: float | None = None

    @property
    def stream(self) -> bool:
        """Whether the client asked for a streamed (SSE) answer."""
        return bool(self.request and self.request.stream)

    @property
    def elapsed_ms(self) -> float:
        """Milliseconds since the request's headers arrived (until it finished, once it has)."""
        end = self.finished_at or time.perf_counter()
        return (end - self.started) * 1000.0
