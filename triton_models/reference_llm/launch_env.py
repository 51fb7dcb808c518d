"""Launch-time overrides of a tier's config parameters, read from the environment."""

from __future__ import annotations

import os
from typing import Mapping, Optional


def tier_override(base: str, tier: str, env: Optional[Mapping[str, str]] = None) -> Optional[tuple[str, str]]:
    """``(name, value)`` of the first of ``<base>_<TIER>`` and ``<base>`` that is set (non-empty)
    in ``env`` (default: this process's environment), or None.

    :param tier: the tier's name, ``large`` or ``llm-large`` in any case.
    """
    env = os.environ if env is None else env
    tier_key = tier.lower().removeprefix("llm-").upper()
    for name in (f"{base}_{tier_key}", base):
        if env.get(name):
            return name, env[name]
    return None
