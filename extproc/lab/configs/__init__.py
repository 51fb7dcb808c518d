"""The two gateway configurations a growth-lab run compares, as YAML documents (dicts).

* **naive** (``naive.yaml``, shipped): every request to the large model, only the accounting on.
* **gateway**: the embedded default configuration (``extproc/framework/default_config.yaml``,
  passed in by the caller: the lab does not import the framework) plus the plugins the workload
  turns on (e.g. ``semantic_cache``, ``context_caps``), each put at its place in the documented
  plugin order (:data:`PLUGIN_ORDER`), with the naive file's ``costs`` so both modes are priced
  alike.

Both get ``usage_records`` writing to a file under the run's directory (not the shared Redis,
which the runner flushes between scales).
"""

from __future__ import annotations

import copy
from importlib import resources
from typing import Iterable

import yaml

#: The plugin order of the README (Plugins; Budgets, tenants and context discipline): where an
#: opt-in plugin goes among the defaults.
PLUGIN_ORDER = (
    "tenancy", "retrieval", "context_caps", "budgets", "admin_api",
    "route_rules", "semantic_routes", "learned_router", "budget_downgrade", "load_spill", "model_tiers",
    "idempotency", "exact_cache", "semantic_cache", "coalescing",
    "request_log", "usage_records", "metrics",
)


def naive_text() -> str:
    """The shipped naive baseline (``extproc/lab/configs/naive.yaml``)."""
    return resources.files(__name__).joinpath("naive.yaml").read_text()


def naive_config() -> dict:
    return yaml.safe_load(naive_text())


def _rank(name: str) -> int:
    return PLUGIN_ORDER.index(name) if name in PLUGIN_ORDER else PLUGIN_ORDER.index("request_log")


def add_plugins(config: dict, additions: Iterable[dict]) -> dict:
    """``config`` with ``additions`` (plugin entries) merged into its ``plugins`` list.

    An entry naming a plugin already listed replaces its settings (and ``on_error``,
    ``enabled`` when given); a new one is inserted before the first listed plugin that comes
    after it in :data:`PLUGIN_ORDER` (unknown plugins go before ``request_log``).
    """
    out = copy.deepcopy(config)
    plugins = out.setdefault("plugins", [])
    for entry in additions:
        entry = dict(entry)
        if "name" not in entry:
            raise ValueError(f"a workload's gateway plugin needs a name: {entry!r}")
        found = next((p for p in plugins if p.get("name") == entry["name"]), None)
        if found is not None:
            found.update(entry)
            continue
        rank = _rank(entry["name"])
        at = next((i for i, p in enumerate(plugins) if _rank(p.get("name", "")) > rank), len(plugins))
        plugins.insert(at, entry)
    return out


def with_usage_file(config: dict, path: str) -> dict:
    """``config`` with ``usage_records`` writing to the file ``path`` (sink ``file``)."""
    out = copy.deepcopy(config)
    for entry in out.get("plugins") or ():
        if entry.get("name") == "usage_records":
            entry["settings"] = {**(entry.get("settings") or {}), "sink": "file", "path": path}
    return out


def gateway_config(default_text: str, additions: Iterable[dict] = ()) -> dict:
    """The gateway mode: the default configuration, the workload's plugins, the lab's costs."""
    config = add_plugins(yaml.safe_load(default_text), additions)
    config["costs"] = {**(config.get("costs") or {}), **naive_config()["costs"]}
    return config
