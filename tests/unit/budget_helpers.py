"""Helpers for the tenancy / budgets / context tests: a harness config with named plugins."""

from __future__ import annotations

from extproc.framework.config import PluginEntry, load_config

PEPPER = "unit-test-pepper-0123456789abcdef"


def config_with(*entries: dict, workers: int = 1, tiers: dict | None = None):
    """The embedded default config with these plugin entries (then model_tiers), ``workers`` workers."""
    cfg = load_config(None)
    update = {"plugins": [PluginEntry(**e) for e in entries] + [PluginEntry(name="model_tiers")],
              "server": cfg.server.model_copy(update={"workers": workers})}
    if tiers is not None:
        update["tiers"] = {name: cfg.tiers[name].model_copy(update=changes) for name, changes in tiers.items()}
    return cfg.model_copy(update=update)
