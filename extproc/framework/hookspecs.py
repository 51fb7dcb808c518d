"""Every hook a plugin can implement, in the order a request meets them.

A plugin implements a hook by defining a function (or method) of the same name, marked with
``@hookimpl``, taking any subset of the arguments listed here. A hook may be ``async def``; the
gateway awaits it. Hooks are called in the order the configuration lists the plugins.

Short-circuiting: a request-phase hook (``extproc_request_headers``, ``extproc_request_parsed``,
``extproc_before_upstream``) may return a :class:`~extproc.wire.decisions.Reply` (or raise
:class:`~extproc.formats.openai.OpenAIError`) to answer the client at once; the first one wins and
no later plugin runs. Any other exception is a *plugin failure*, handled by the plugin's
``on_error`` policy (see ``docs/plugins.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Protocol

import pluggy

if TYPE_CHECKING:
    from extproc.framework.config import GatewayConfig
    from extproc.framework.context import RequestContext, ResponseChunk, TierChoice, UpstreamRequest
    from extproc.framework.gateway import TierRegistry
    from extproc.observability.cost_model import CostModel
    from extproc.state.store import Store
    from extproc.wire.decisions import Reply

PROJECT = "extproc"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class GatewayView(Protocol):
    """What hooks (and the request lifecycle) see of a worker's gateway.

    The concrete :class:`~extproc.framework.gateway.Gateway` satisfies it; plugins depend on this
    shape, never on the class, so the framework's modules do not import each other in a circle.
    """

    config: "GatewayConfig"  #: the validated configuration
    tiers: "TierRegistry"  #: tiers by name or alias, upstream auth
    store: "Store"  #: the shared state (memory or Redis)
    cost_model: "CostModel"  #: prices a request's usage
    hooks: Any  #: the :class:`~extproc.framework.plugin_manager.HookRunner` (``failures``, ``plugins``)
    max_request_bytes: int  #: the body size limit (``server.max_request_bytes``)
    models_list: dict  #: the ``GET /v1/models`` answer


class PluginFailure(Exception):
    """A fail-closed plugin raised in a request-phase hook (the lifecycle answers 500 ``plugin_error``)."""

    def __init__(self, plugin: str, hook: str, original: BaseException):
        super().__init__(f"plugin {plugin!r} failed in {hook}: {original!r}")
        self.plugin, self.hook, self.original = plugin, hook, original


@hookspec
def extproc_startup(gateway: "GatewayView") -> Awaitable[None] | None:
    """Once per worker process, before it takes traffic: open connections, load models.

    :param gateway: the worker's shared state (config, tiers, store).
    """


@hookspec
def extproc_shutdown(gateway: "GatewayView") -> Awaitable[None] | None:
    """Once per worker process, after the last stream drained: close what startup opened.

    :param gateway: the worker's shared state.
    """


@hookspec(firstresult=True)
def extproc_request_headers(ctx: "RequestContext") -> "Reply | None":
    """The request's headers arrived (the body has not). firstresult: the first Reply answers.

    Also called for ``GET /v1/models`` (``ctx.endpoint`` None, ``ctx.path`` ``/v1/models``), which the
    gateway answers itself once no plugin refused it: identity policies guard it too.

    :param ctx: the request; ``ctx.headers``, ``ctx.path``, ``ctx.endpoint`` are set, ``ctx.request`` is not.
    :return: a Reply to answer now (auth refused, say), or None to go on.
    """


@hookspec(firstresult=True)
def extproc_request_parsed(ctx: "RequestContext") -> "Reply | None":
    """The body was parsed into an OpenAI request (``ctx.request``). firstresult.

    Policies that look at the prompt (caches, budgets, context caps) work here; they may change
    ``ctx.request`` in place (trim messages, cap ``max_tokens``).

    :param ctx: the request, with ``ctx.request`` set.
    :return: a Reply to answer now (a cache hit, a budget refusal), or None to go on.
    """


@hookspec(firstresult=True)
def extproc_choose_tier(ctx: "RequestContext", candidates: list[str]) -> "TierChoice | str | None":
    """Pick the model tier. firstresult: the first plugin that names a tier decides.

    A plugin may also narrow ``candidates`` in place (remove tiers a tenant may not use) and return
    None, leaving the choice to later plugins.

    :param ctx: the request, with ``ctx.request`` set.
    :param candidates: the tiers still allowed, in configuration order (mutable).
    :return: a tier name, a :class:`~extproc.framework.context.TierChoice` (tier and reason), or None to pass.
    """


@hookspec
def extproc_adjust_tier(ctx: "RequestContext", choice: "TierChoice", candidates: list[str]) -> None:
    """The tier is chosen; adjust it (every plugin, in order) before the upstream request is built.

    For policies that move a decision rather than make one: spill-over from a loaded tier,
    downgrading a request over its soft budget. Each plugin sees the choice as the previous one
    left it and may change ``choice.tier`` and ``choice.reason`` in place; it should keep the
    new tier within ``candidates`` and note what it did in ``ctx.route_trace``.

    :param ctx: the request, with ``ctx.request`` set (``ctx.tier`` is not set yet).
    :param choice: the :class:`~extproc.framework.context.TierChoice` made by ``extproc_choose_tier`` (mutable).
    :param candidates: the tiers still allowed after ``extproc_choose_tier``, in configuration order.
    """


@hookspec(firstresult=True)
def extproc_before_upstream(ctx: "RequestContext", upstream: "UpstreamRequest") -> "Reply | None":
    """The final upstream request is built (path, body, headers); the last chance to change or stop it.

    :param ctx: the request, with ``ctx.tier`` set.
    :param upstream: what goes to the tier's cluster; its fields may be changed in place.
    :return: a Reply to answer now, or None to send it.
    """


@hookspec
def extproc_response_chunk(ctx: "RequestContext", chunk: "ResponseChunk") -> None:
    """A piece of the answer is on its way to the client (each SSE chunk, or the whole JSON body).

    Observational: the client's bytes are already decided. Called in order, once per body chunk
    that carried text.

    :param ctx: the request.
    :param chunk: the text the chunk added and the bytes sent to the client.
    """


@hookspec
def extproc_response_complete(ctx: "RequestContext") -> Awaitable[None] | None:
    """The upstream's answer is complete; ``ctx.usage`` holds its token usage and ``ctx.cost_usd`` its cost.

    :param ctx: the request, with ``ctx.usage`` and ``ctx.response_status`` set.
    """


@hookspec
def extproc_request_finished(ctx: "RequestContext") -> Awaitable[None] | None:
    """Always called once per request, last, however it ended.

    ``ctx.outcome`` is ``"completed"`` (the upstream answered), ``"replied"`` (the gateway answered
    itself), ``"aborted"`` (the client or Envoy went away before the end) or ``"failed"`` (the
    upstream or the gateway failed). Release what ``extproc_request_parsed`` reserved here.

    :param ctx: the request.
    """


HOOK_NAMES: tuple[str, ...] = tuple(
    name for name, value in dict(globals()).items() if name.startswith("extproc_") and callable(value)
)
"""Every hook name, in lifecycle order."""

REQUEST_PHASE_HOOKS = frozenset(
    {"extproc_request_headers", "extproc_request_parsed", "extproc_choose_tier", "extproc_adjust_tier",
     "extproc_before_upstream"}
)
"""Hooks that run before the upstream call: a fail_closed plugin raising here refuses the request."""

FAIL_CLOSED_HOOKS = REQUEST_PHASE_HOOKS | {"extproc_startup"}
"""Hooks where a fail_closed plugin's failure stops what it was part of (a request, a worker's start)."""

