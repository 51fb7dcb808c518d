"""The cost model: per-token and GPU-hour tier pricing, and the per-request cost split."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from extproc.framework.config import ConfigError, default_config_text, parse_config
from extproc.framework.context import RequestContext
from extproc.observability.cost_model import CostModel, GpuHourMeter, gateway_ms
from extproc.formats.openai import Usage
from extproc.framework.testing import GatewayHarness
from extproc.observability.triton_metrics import ModelLoad, TritonMetricsError


def config(**changes):
    data = yaml.safe_load(default_config_text())
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(data)


def load(compute_us, inferences, execs, success=None):
    return ModelLoad(pending=0, queue_us_total=0.0, inference_count=inferences, exec_count=execs,
                     success=success if success is not None else inferences, compute_infer_us_total=compute_us)


class FakeTriton:
    def __init__(self):
        self.loads = {}
        self.fail = False

    async def snapshot(self):
        if self.fail:
            raise TritonMetricsError("down")
        return self.loads


async def test_per_token_price_is_tokens_times_price_and_is_what_ctx_cost_usd_says():
    async with GatewayHarness() as gw:
        result = await gw.chat("hello", model="medium", answer="one two three")
    usage = result.ctx.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 3)
    assert result.ctx.cost_usd == pytest.approx((5 * 0.0005 + 3 * 0.0015) / 1000)


def test_breakdown_splits_prompt_completion_embeddings_overhead():
    cfg = config(costs={"gateway_cpu_hour_usd": 3.6, "embedding_call_usd": 0.001})
    model = CostModel(cfg)
    ctx = RequestContext("r", "POST", "/v1/chat/completions", {})
    ctx.tier_config = cfg.tiers["small"]
    ctx.usage = Usage(prompt_tokens=1000, completion_tokens=500)
    ctx.cost_usd = model.upstream_cost(ctx.tier_config, ctx.usage)
    ctx.embedding_calls = 2
    ctx.timings_ms.update({"phase:request_headers": 1.0, "phase:request_body": 3.0, "plugin:x": 2.0, "ttft": 50.0})
    cost = model.breakdown(ctx)
    assert cost.prompt == pytest.approx(0.0001) and cost.completion == pytest.approx(0.0001)
    assert cost.retries == 0 and cost.embeddings == pytest.approx(0.002)
    assert gateway_ms(ctx.timings_ms) == 4.0  # phases only; plugin time is inside them, ttft is not gateway time
    assert cost.overhead == pytest.approx(4.0 * 3.6 / 3.6e6)
    assert cost.total == pytest.approx(0.0002 + 0.002 + 4e-6)
    assert model.breakdown(ctx) is cost  # computed once per request


@pytest.mark.parametrize("headers, retry", [
    ({"x-stainless-retry-count": "0"}, False), ({"x-stainless-retry-count": "2"}, True),
    ({"x-retry-attempt": "1"}, True), ({"x-retry-attempt": "abc"}, False), ({}, False),
])
def test_a_client_retry_is_costed_as_retries(headers, retry):
    cfg = config()
    model = CostModel(cfg)
    ctx = RequestContext("r", "POST", "/v1/chat/completions", headers)
    ctx.tier_config = cfg.tiers["small"]
    ctx.usage = Usage(prompt_tokens=10, completion_tokens=10)
    ctx.cost_usd = model.upstream_cost(ctx.tier_config, ctx.usage)
    cost = model.breakdown(ctx)
    assert model.is_retry(ctx) is retry
    assert cost.total == pytest.approx(ctx.cost_usd)
    assert (cost.retries > 0) is retry and (cost.prompt > 0) is not retry


def test_gpu_hour_and_token_prices_together_are_refused():
    with pytest.raises(ConfigError, match="gpu_hour_usd: .*either per-1K token prices or a GPU-hour price"):
        config(tiers={"small": {"model": "m", "price": {"prompt_per_1k": 1, "gpu_hour_usd": 2}}})
    with pytest.raises(ConfigError, match="GPU-hour pricing needs server.triton_metrics_url"):
        config(server={"triton_metrics_url": None},
               tiers={"small": {"model": "m", "price": {"gpu_hour_usd": 2}}})


async def test_gpu_hour_apportions_batch_compute_time_by_request_and_size():
    triton = FakeTriton()
    meter = GpuHourMeter(triton, interval=0.0, smoothing=1.0)
    cfg = config(server={"triton_metrics_url": "http://127.0.0.1:1/metrics"},
                 tiers={"small": {"model": "llm-small", "price": {"gpu_hour_usd": 3.6, "gpus": 2}}})
    price = cfg.tiers["small"].price
    # Since Triton started: 4 requests in 2 executions (batches of 2), each request booked the
    # batch's 1 s -> compute 4 s counted, GPU busy 2 s, 0.5 s per request.
    triton.loads = {"llm-small": load(4_000_000, 4, 2)}
    assert meter.cost("llm-small", 100, price) == 0.0  # nothing read yet: the reading starts now
    await asyncio.sleep(0)  # the background reading runs
    await meter._task
    assert meter.busy_us_per_request["llm-small"] == pytest.approx(500_000)
    # 3.6 USD per GPU-hour x 2 GPUs = 0.002 USD per second; 0.5 s -> 0.001 USD for a mean-sized request.
    assert meter.cost("llm-small", 100, price) == pytest.approx(0.001)
    assert meter.cost("llm-small", 200, price) == pytest.approx(0.002)  # twice the tokens, twice the share
    # The next reading takes only the delta: 2 more requests alone (batch 1), 0.25 s each.
    triton.loads = {"llm-small": load(4_500_000, 6, 4)}
    await meter.refresh()
    assert meter.busy_us_per_request["llm-small"] == pytest.approx(250_000)
    # Triton down: the last rate is kept, no exception reaches the request.
    triton.fail = True
    await meter.refresh()
    assert meter.busy_us_per_request["llm-small"] == pytest.approx(250_000)
    await meter.close()


async def test_gpu_hour_priced_tier_through_the_lifecycle():
    cfg = config(server={"triton_metrics_url": "http://127.0.0.1:1/metrics"},
                 tiers={"small": {"model": "llm-small", "price": {"gpu_hour_usd": 3.6}}}, default_tier="small",
                 plugins=[{"name": "model_tiers"}])
    triton = FakeTriton()
    triton.loads = {"llm-small": load(1_000_000, 1, 1)}  # 1 s per request
    async with GatewayHarness(config=cfg) as gw:
        gw.gateway.cost_model.meter = meter = GpuHourMeter(triton, interval=0.0, smoothing=1.0)
        await meter.refresh()
        result = await gw.chat("hi", model="small", answer="a b c")
    assert result.ctx.cost_usd == pytest.approx(0.001)  # first request: it is the mean-sized one
    split = gw.gateway.cost_model.breakdown(result.ctx)
    assert split.prompt + split.completion == pytest.approx(0.001)
    assert split.prompt == pytest.approx(0.001 * 5 / 8)  # in proportion to tokens (5 prompt, 3 completion)
