"""The upstream kinds, by the name a tier's ``kind`` uses. A new kind: its file, and a line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from extproc.upstreams.base import Upstream
from extproc.upstreams.openai import OpenAIUpstream
from extproc.upstreams.triton import TritonUpstream

if TYPE_CHECKING:
    from extproc.framework.config import TierConfig

UPSTREAMS: dict[str, Upstream] = {
    "triton": TritonUpstream(),
    "openai": OpenAIUpstream(),
}


def upstream_for(tier: "TierConfig") -> Upstream:
    """The upstream kind that serves ``tier`` (its ``kind`` was checked against :data:`UPSTREAMS`)."""
    return UPSTREAMS[tier.kind]


def default_max_tokens(tier: "TierConfig | None") -> int | None:
    """What ``tier``'s upstream generates when the client sets no limit (None: it decides, or no tier)."""
    return upstream_for(tier).default_max_tokens(tier) if tier is not None else None


def exports_triton_metrics(tier: "TierConfig") -> bool:
    """Whether ``tier``'s server exports Triton's metrics (queue depth for load shedding, the
    metrics endpoint's per-tier series)."""
    return UPSTREAMS[tier.kind].exports_triton_metrics


def kinds_taking_api_keys() -> list[str]:
    """The kinds whose tiers may set ``api_key_env``, sorted."""
    return sorted(kind for kind, upstream in UPSTREAMS.items() if upstream.takes_api_key)


def known_kinds() -> list[str]:
    """The registered kinds, sorted (for error messages)."""
    return sorted(UPSTREAMS)
