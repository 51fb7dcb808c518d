"""How a request authenticates upstream, the same for every kind that takes a key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from extproc import environment

if TYPE_CHECKING:
    from extproc.framework.config import TierConfig


class UpstreamConfigError(ValueError):
    """A tier's upstream settings cannot work (the framework reports it as a ConfigError)."""


def auth_headers(name: str, tier: "TierConfig") -> tuple[list[tuple[str, str]], list[str]]:
    """(headers to set, headers to remove): the tier's own key (``api_key_env``) replaces the
    client's ``Authorization``; without one the client's header is removed unless the tier sets
    ``forward_authorization``. The client's gateway API key never goes upstream by accident."""
    if tier.api_key_env:
        key = environment.named(tier.api_key_env)
        if not key:
            raise UpstreamConfigError(
                f"tiers.{name}.api_key_env: ${tier.api_key_env} is not set (the upstream's API key)")
        return [("authorization", f"Bearer {key}")], []
    if tier.forward_authorization:
        return [], []
    return [], ["authorization"]
