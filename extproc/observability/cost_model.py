"""What a request cost, and where the money went.

Two ways to price a tier (``tiers.<name>.price``):

* **per token** (``prompt_per_1k``, ``completion_per_1k``): ``cost = prompt_tokens × prompt_per_1k / 1000
  + completion_tokens × completion_per_1k / 1000``.
* **per GPU-hour** (``gpu_hour_usd``, ``gpus``): the tier's GPUs cost money while Triton computes, and
  that money is apportioned to requests by the compute time Triton reports (:class:`GpuHourMeter`).
  Every ``interval`` seconds (in the background, never on a request's path) each worker reads
  Triton's ``/metrics`` and, per model, takes the deltas since its last reading of
  ``nv_inference_compute_infer_duration_us`` (C), ``nv_inference_count`` (I, batch items = requests)
  and ``nv_inference_exec_count`` (E, model executions). Triton books a batch's compute time to every
  request in the batch, so C counts a batch of b requests b times: the GPU was busy about
  ``C × E / I`` µs, which is ``C × E / I²`` µs per request. A request is charged that per-request
  busy time (a moving average over readings) scaled by its own size, ``tokens / mean tokens per
  request`` (mean over this worker's recent requests of the tier), times ``gpu_hour_usd × gpus /
  3600 s``. Its prompt/completion split is in proportion to its token counts. Until the first
  reading (Triton not yet reachable, or nothing served yet) a GPU-priced request costs 0.

Beyond the upstream (:meth:`CostModel.breakdown`), a usage record splits the cost into

* ``prompt`` / ``completion``: the upstream cost above, for a first attempt;
* ``retries``: the upstream cost of a request the client marked as a retry (a header in
  ``costs.retry_headers`` with a value > 0, e.g. the OpenAI SDK's ``x-stainless-retry-count``):
  money spent again for an answer already paid for once;
* ``embeddings``: ``ctx.embedding_calls × costs.embedding_call_usd`` (policies' embedding calls);
* ``overhead``: the gateway's own time (the ext_proc phases in ``ctx.timings_ms``) ×
  ``costs.gateway_cpu_hour_usd``.

``total = prompt + completion + retries + embeddings + overhead``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from extproc.framework.config import GatewayConfig, Price
    from extproc.framework.context import RequestContext
    from extproc.formats.openai import Usage

log = logging.getLogger(__name__)

PHASE_PREFIX = "phase:"
PLUGIN_PREFIX = "plugin:"


@dataclass(slots=True)
class CostBreakdown:
    """A request's cost in USD, by where it went."""

    prompt: float = 0.0
    completion: float = 0.0
    retries: float = 0.0
    embeddings: float = 0.0
    overhead: float = 0.0

    @property
    def total(self) -> float:
        return self.prompt + self.completion + self.retries + self.embeddings + self.overhead

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def gateway_ms(timings_ms: dict[str, float]) -> float:
    """The gateway's own time for a request: the sum of its ext_proc phases (plugins included)."""
    return sum(v for k, v in timings_ms.items() if k.startswith(PHASE_PREFIX))


class GpuHourMeter:
    """Per-request GPU cost from Triton's compute-time counters (see the module docstring).

    :param client: a :class:`~extproc.observability.triton_metrics.TritonMetricsClient` (or anything with an
        async ``snapshot()`` returning ``{model: ModelLoad}``).
    :param interval: seconds between readings.
    :param smoothing: weight of the newest reading in the moving averages.
    """

    def __init__(self, client, *, interval: float = 5.0, smoothing: float = 0.3):
        self.client = client
        self.interval = interval
        self.smoothing = smoothing
        self.busy_us_per_request: dict[str, float] = {}
        self.tokens_per_request: dict[str, float] = {}
        self._previous: dict = {}
        self._next_refresh = 0.0
        self._task: asyncio.Task | None = None

    def cost(self, model: str, tokens: int, price: "Price") -> float:
        """The request's GPU cost in USD; starts a background reading when the last one is stale."""
        mean = self.tokens_per_request.get(model)
        mean = float(tokens) if mean is None else mean
        self.tokens_per_request[model] = mean + self.smoothing * (tokens - mean)  # for the next requests
        now = time.monotonic()
        if now >= self._next_refresh and (self._task is None or self._task.done()):
            self._next_refresh = now + self.interval
            try:
                self._task = asyncio.get_running_loop().create_task(self.refresh())
            except RuntimeError:  # no loop (a synchronous caller): no reading
                pass
        busy = self.busy_us_per_request.get(model)
        if busy is None or mean <= 0:
            return 0.0
        return busy * (tokens / mean) * price.gpu_hour_usd * price.gpus / 3.6e9

    async def refresh(self) -> None:
        """Read Triton once and update each model's busy time per request."""
        try:
            loads = await self.client.snapshot()
        except Exception as exc:  # noqa: BLE001 - Triton down: keep the last rates
            log.debug("GPU-hour pricing: cannot read Triton metrics: %s", exc)
            return
        for model, load in loads.items():
            previous = self._previous.get(model)
            self._previous[model] = load
            delta = load.since(previous) if previous is not None else load
            if delta.inference_count <= 0 or delta.exec_count <= 0:
                continue
            per_request = delta.compute_infer_us_total * delta.exec_count / delta.inference_count ** 2
            old = self.busy_us_per_request.get(model)
            self.busy_us_per_request[model] = (per_request if old is None
                                               else old + self.smoothing * (per_request - old))

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass


class CostModel:
    """Prices requests for one gateway worker (``gateway.cost_model``)."""

    def __init__(self, config: "GatewayConfig", *, meter: GpuHourMeter | None = None):
        self.costs = config.costs
        self.retry_headers = tuple(h.lower() for h in config.costs.retry_headers)
        self.overhead_usd_per_ms = config.costs.gateway_cpu_hour_usd / 3.6e6
        self.meter = meter
        if meter is None and any(t.price.gpu_hour_usd for t in config.tiers.values()):
            from extproc.observability.triton_metrics import TritonMetricsClient

            self.meter = GpuHourMeter(TritonMetricsClient(config.server.triton_metrics_url, timeout=1.0,
                                                          max_age=1.0))

    def upstream_cost(self, tier, usage: "Usage") -> float:
        """The upstream's cost for ``usage`` on ``tier`` (a :class:`~extproc.framework.config.TierConfig`)."""
        price = tier.price
        if price.gpu_hour_usd and self.meter is not None:
            return self.meter.cost(tier.model, usage.prompt_tokens + usage.completion_tokens, price)
        return (usage.prompt_tokens * price.prompt_per_1k + usage.completion_tokens * price.completion_per_1k) / 1000.0

    def is_retry(self, ctx: "RequestContext") -> bool:
        """Whether the client marked this request as a retry of an earlier one."""
        headers = ctx.headers
        for name in self.retry_headers:
            value = headers.get(name)
            if value and value.strip().isdigit() and int(value) > 0:
                return True
        return False

    def breakdown(self, ctx: "RequestContext") -> CostBreakdown:
        """The request's cost split (computed once per request, then kept in ``ctx.plugin_state``)."""
        cached = ctx.plugin_state.get("cost_model")
        if cached is not None:
            return cached
        out = CostBreakdown()
        usage, upstream = ctx.usage, ctx.cost_usd or 0.0
        if usage is not None and upstream:
            price = ctx.tier_config.price if ctx.tier_config is not None else None
            if price is not None and not price.gpu_hour_usd:
                prompt = usage.prompt_tokens * price.prompt_per_1k / 1000.0
                completion = upstream - prompt
            else:
                tokens = usage.prompt_tokens + usage.completion_tokens
                prompt = upstream * usage.prompt_tokens / tokens if tokens else 0.0
                completion = upstream - prompt
            if self.is_retry(ctx):
                out.retries = upstream
            else:
                out.prompt, out.completion = prompt, completion
        out.embeddings = ctx.embedding_calls * self.costs.embedding_call_usd
        if self.overhead_usd_per_ms:
            out.overhead = gateway_ms(ctx.timings_ms) * self.overhead_usd_per_ms
        ctx.plugin_state["cost_model"] = out
        return out

    async def close(self) -> None:
        if self.meter is not None:
            await self.meter.close()
