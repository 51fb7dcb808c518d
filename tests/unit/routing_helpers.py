"""Helpers for the routing policies' tests: a config with one chosen plugin chain, and a fake context setter."""

from __future__ import annotations

from extproc import hookimpl
from extproc.framework.config import PluginEntry, load_config


def config_with(*entries: tuple[str, dict] | str, tiers_update: dict | None = None):
    """The embedded default config with only these plugins (name or (name, settings)), then model_tiers."""
    config = load_config(None)
    plugins = []
    for e in entries:
        name, settings = (e, {}) if isinstance(e, str) else e
        plugins.append(PluginEntry(name=name, settings=settings))
    plugins.append(PluginEntry(name="model_tiers"))
    update = {"plugins": plugins}
    if tiers_update:
        tiers = {n: t.model_copy(update=tiers_update.get(n, {})) for n, t in config.tiers.items()}
        update["tiers"] = tiers
    return config.model_copy(update=update)


class RequestFacts:
    """Sets what other policies would: tenant, workflow and the soft-budget mark, from test headers."""

    @hookimpl
    def extproc_request_headers(self, ctx):
        h = ctx.headers
        if "x-test-tenant" in h:
            ctx.tenant = h["x-test-tenant"]
        if "x-test-workflow" in h:
            ctx.workflow = h["x-test-workflow"]
        if h.get("x-test-over-soft-budget") == "1":
            ctx.over_soft_budget = True
