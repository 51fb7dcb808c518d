"""The state one worker process shares across its streams: configuration, tiers and plugins."""

from __future__ import annotations

import logging
from typing import Any

from extproc.embeddings.prompt import configure_prompt_embedder
from extproc.framework.config import ConfigError, GatewayConfig, TierConfig
from extproc.observability.cost_model import CostModel
from extproc.framework.lifecycle import RequestLifecycle
from extproc.framework.plugin_manager import HookRunner, load_plugins
from extproc.state.store import Store, open_store
from extproc.upstreams.auth import UpstreamConfigError
from extproc.upstreams.registry import upstream_for

log = logging.getLogger(__name__)


class TierRegistry:
    """The configured tiers, looked up by tier name or public alias."""

    def __init__(self, config: GatewayConfig):
        self.tiers: dict[str, TierConfig] = dict(config.tiers)
        self.default = config.default_tier
        self.auto_model = config.auto_model
        self._by_name: dict[str, str] = {}
        for name, tier in self.tiers.items():
            self._by_name[name] = name
            for alias in tier.aliases:
                self._by_name[alias] = name
        self._upstream_auth = {name: self._auth_headers(name, tier) for name, tier in self.tiers.items()}

    @staticmethod
    def _auth_headers(name: str, tier: TierConfig) -> tuple[list[tuple[str, str]], list[str]]:
        """(headers to set, headers to remove) for the upstream's authentication, from its kind."""
        try:
            return upstream_for(tier).auth_headers(name, tier)
        except UpstreamConfigError as err:
            raise ConfigError(str(err)) from None

    def upstream_auth(self, tier: str) -> tuple[list[tuple[str, str]], list[str]]:
        """How a request to ``tier`` authenticates upstream: (headers to set, headers to remove).

        The tier's own key (``api_key_env``) replaces the client's ``Authorization``; without one
        the client's header is removed unless the tier sets ``forward_authorization``.
        """
        return self._upstream_auth[tier]

    def resolve(self, model: str) -> str | None:
        """The tier a model name pins, or None (``auto`` and unknown names pin nothing)."""
        return self._by_name.get(model)

    def public_models(self) -> list[str]:
        """Every model name a client may send: ``auto``, tier names and aliases."""
        return [self.auto_model, *self._by_name]


class Gateway:
    """One worker's shared state; builds a :class:`~extproc.framework.lifecycle.RequestLifecycle` per stream."""

    def __init__(self, config: GatewayConfig, *, extra_plugins: tuple[tuple[str, Any, dict, bool], ...] = ()):
        self.config = config
        self.tiers = TierRegistry(config)
        self.embedder = configure_prompt_embedder(config.embeddings)  # before the plugins take it
        pm, loaded = load_plugins(config, extra=extra_plugins)
        self.hooks = HookRunner(pm, loaded)
        self.max_request_bytes = config.server.max_request_bytes
        self.store: Store = open_store(config.state)
        self.cost_model = CostModel(config)
        self.models_list = {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "llm-extproc"}
                     for m in self.tiers.public_models()],
        }

    @property
    def plugin_names(self) -> list[str]:
        """The loaded plugins, in call order."""
        return [p.name for p in self.hooks.plugins]

    async def start(self) -> None:
        """Check the store, then run every plugin's ``extproc_startup``.

        An unreachable Redis is logged, not fatal: policies degrade until it comes back.
        A fail-closed plugin failing to start stops the worker.
        """
        if not await self.store.ping():
            log.warning("shared state store %s is unreachable; policies using it degrade until it is back",
                        self.config.state.redis_url)
        await self.hooks.each("extproc_startup", None, gateway=self)

    async def stop(self) -> None:
        """Run every plugin's ``extproc_shutdown``."""
        await self.hooks.each("extproc_shutdown", None, gateway=self)
        await self.cost_model.close()
        await self.store.close()

    def new_stream(self) -> RequestLifecycle:
        """A handler for one ext_proc stream (one HTTP request)."""
        return RequestLifecycle(self)
