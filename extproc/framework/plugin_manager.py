"""Loading plugins and calling their hooks.

Every plugin, built-in or not, is an entry point in the ``extproc.plugins`` group; the built-in
ones are declared in this project's own ``pyproject.toml`` exactly as a third-party package
declares its own. The configuration's ``plugins:`` list picks which load and in what order
(omitted: :data:`DEFAULT_PLUGINS`); ``$EXTPROC_PLUGINS`` (comma-separated names) further limits
which of them load, for debugging.

Hooks are called by :class:`HookRunner`, not through ``pm.hook``: it awaits ``async def`` hooks,
and applies each plugin's ``on_error`` policy when it raises:

* ``fail_closed`` (the default): a failure in a request-phase hook refuses the request with an
  OpenAI-style 500 (``code: plugin_error``) naming the plugin. Traffic never slips past a broken
  policy unnoticed.
* ``fail_open``: the failure is logged (with traceback, then rate-limited), counted in
  :attr:`HookRunner.failures`, and named in the ``x-extproc-degraded`` response header; the
  request goes on as if the plugin had returned nothing.

Hooks after the upstream call (response chunks, completion, finish) always fail open: the answer
has been paid for and the client gets it; the failure is still logged, counted and flagged.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from time import perf_counter
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

import pluggy
from pydantic import ValidationError

from extproc import environment
from extproc.framework import hookspecs
from extproc.framework.hookspecs import PluginFailure
from extproc.framework.config import ConfigError, GatewayConfig, PluginEntry
from extproc.formats.openai import OpenAIError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "extproc.plugins"
PLUGINS_ENV = environment.PLUGINS
DEFAULT_PLUGINS: tuple[str, ...] = ("model_tiers", "request_log", "usage_records", "metrics")
"""Built-in plugins loaded when the configuration has no ``plugins:`` list."""



def installed_plugins() -> dict[str, Any]:
    """Entry points of the ``extproc.plugins`` group, by name (not loaded)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def build_plugin(name: str, target: Any, settings: dict, where: str) -> Any:
    """Make the object to register from an entry point's target.

    A class is instantiated, with its settings validated by its nested pydantic ``Settings`` model
    when it has one (errors name ``plugins[i].settings.<key>``). A module is registered as it is
    and takes no settings.
    """
    settings_model = getattr(target, "Settings", None)
    if settings_model is None:
        if settings:
            raise ConfigError(f"{where}.settings: plugin {name!r} takes no settings (got {', '.join(settings)})")
        return target() if inspect.isclass(target) else target
    try:
        validated = settings_model.model_validate(settings)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"{where}.settings.{loc}: {msg}")
        raise ConfigError("\n".join(problems)) from None
    if inspect.isclass(target):
        return target(validated)
    target.configure(validated)
    return target


@dataclass(slots=True)
class LoadedPlugin:
    """A registered plugin and its failure policy."""

    name: str
    obj: Any
    fail_open: bool


def load_plugins(config: GatewayConfig, *, extra: tuple[tuple[str, Any, dict, bool], ...] = ()
                 ) -> tuple[pluggy.PluginManager, list[LoadedPlugin]]:
    """Create the plugin manager and register the configured plugins in call order.

    :param config: the validated gateway configuration.
    :param extra: ``(name, object_or_class, settings, fail_open)`` plugins to add after the
        configured ones without an entry point (used by :mod:`extproc.framework.testing`).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    entries = config.plugins if config.plugins is not None else [PluginEntry(name=n) for n in DEFAULT_PLUGINS]
    only = environment.plugin_filter()
    available = installed_plugins()
    loaded: list[LoadedPlugin] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"plugins[{i}]"
        if entry.name in seen:
            raise ConfigError(f"{where}.name: plugin {entry.name!r} is listed twice")
        seen.add(entry.name)
        if not entry.enabled or (only and entry.name not in only):
            continue
        if entry.name not in available:
            known = ", ".join(sorted(available)) or "none"
            raise ConfigError(f"{where}.name: unknown plugin {entry.name!r} (installed: {known})")
        target = available[entry.name].load()
        obj = build_plugin(entry.name, target, entry.settings, where)
        loaded.append(LoadedPlugin(entry.name, obj, entry.on_error == "fail_open"))
    for name, target, settings, fail_open in extra:
        loaded.append(LoadedPlugin(name, build_plugin(name, target, settings, f"plugin {name}"), fail_open))
    # pluggy calls the most recently registered implementation first: register in reverse so
    # that hooks run in configuration order (tryfirst/trylast still apply, as in pluggy).
    for plugin in reversed(loaded):
        pm.register(plugin.obj, name=plugin.name)
    pm.check_pending()
    _refuse_wrappers(pm)
    return pm, loaded


def _refuse_wrappers(pm: pluggy.PluginManager) -> None:
    """Hook wrappers (``wrapper=True``, ``hookwrapper=True``) are refused at start-up.

    :class:`HookRunner` calls each implementation itself, in configuration order, so a wrapper's
    generator would be taken for its result; better a configuration error naming it than a
    policy that silently does nothing.
    """
    for hook in hookspecs.HOOK_NAMES:
        for impl in getattr(pm.hook, hook).get_hookimpls():
            marker = "wrapper=True" if getattr(impl, "wrapper", False) else "hookwrapper=True" if impl.hookwrapper else None
            if marker:
                raise ConfigError(
                    f"plugin {impl.plugin_name!r}: {hook} is marked {marker}; llm-extproc calls hooks itself "
                    "in configuration order and does not support hook wrappers (implement the hook plainly)")


@dataclass(slots=True)
class _Impl:
    plugin: str
    function: Callable
    argnames: tuple[str, ...]
    is_async: bool
    fail_open: bool
    timing_key: str = ""  # "plugin:<name>": its time is summed into ctx.timings_ms under this key


class _FailureLog:
    """Logs a plugin failure with its traceback once, then at most every ``interval`` seconds."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}

    def __call__(self, plugin: str, hook: str, exc: BaseException, count: int, policy: str) -> None:
        key, now = (plugin, hook), time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return
        self._last[key] = now
        log.error(
            "plugin %r raised in %s (%s; %d failure(s) so far): %r",
            plugin, hook, policy, count, exc, exc_info=last is None,
        )


class HookRunner:
    """Calls hooks in configuration order, awaiting async ones and applying failure policies."""

    def __init__(self, pm: pluggy.PluginManager, plugins: list[LoadedPlugin]):
        self.pm = pm
        self.plugins = plugins
        fail_open = {p.name: p.fail_open for p in plugins}
        self.failures: Counter[tuple[str, str]] = Counter()
        self._log_failure = _FailureLog()
        self._chains: dict[str, list[_Impl]] = {}
        for hook in hookspecs.HOOK_NAMES:
            caller = getattr(pm.hook, hook)
            impls = []
            for impl in reversed(caller.get_hookimpls()):  # pluggy's own call order
                fn = impl.function
                impls.append(_Impl(impl.plugin_name, fn, tuple(impl.argnames),
                                   inspect.iscoroutinefunction(fn), fail_open.get(impl.plugin_name, False),
                                   f"plugin:{impl.plugin_name}"))
            self._chains[hook] = impls

    def implementers(self, hook: str) -> list[str]:
        """Names of the plugins implementing ``hook``, in call order."""
        return [i.plugin for i in self._chains[hook]]

    async def first(self, hook: str, ctx, **kwargs) -> Any:
        """Call ``hook`` until one plugin returns something other than None; return that."""
        for impl in self._chains[hook]:
            result = await self._call(impl, hook, ctx, kwargs)
            if result is not None:
                return result
        return None

    async def each(self, hook: str, ctx, **kwargs) -> None:
        """Call ``hook`` on every plugin."""
        for impl in self._chains[hook]:
            await self._call(impl, hook, ctx, kwargs)

    async def _call(self, impl: _Impl, hook: str, ctx, kwargs: dict) -> Any:
        kwargs["ctx"] = ctx
        start = perf_counter()
        try:
            args = [kwargs[name] for name in impl.argnames]
            result = impl.function(*args)
            if impl.is_async or inspect.isawaitable(result):
                result = await result
            return result
        except OpenAIError as exc:
            if hook in hookspecs.REQUEST_PHASE_HOOKS:
                raise  # a deliberate answer, not a failure
            return self._failed(impl, hook, ctx, exc)
        except Exception as exc:  # noqa: BLE001 - every plugin failure goes through the policy
            return self._failed(impl, hook, ctx, exc)
        finally:
            if ctx is not None:  # each plugin's time per request, summed over its hooks (metrics)
                timings = ctx.timings_ms
                timings[impl.timing_key] = timings.get(impl.timing_key, 0.0) + (perf_counter() - start) * 1000.0

    def _failed(self, impl: _Impl, hook: str, ctx, exc: BaseException) -> None:
        self.failures[(impl.plugin, hook)] += 1
        closable = hook in hookspecs.FAIL_CLOSED_HOOKS
        policy = "fail_open" if impl.fail_open or not closable else "fail_closed"
        self._log_failure(impl.plugin, hook, exc, self.failures[(impl.plugin, hook)], policy)
        if policy == "fail_closed":
            raise PluginFailure(impl.plugin, hook, exc) from exc
        if ctx is not None and impl.plugin not in ctx.degraded:
            ctx.degraded.append(impl.plugin)
        return None
