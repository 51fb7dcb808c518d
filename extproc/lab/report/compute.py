"""The report's numbers for one run (one mode at one scale), from its ``requests.jsonl`` lines and
``summary.json`` (:mod:`extproc.lab.runner.run`).

Definitions (the README of :mod:`extproc.lab.runner` says why):

* **answered**: requests whose outcome is ``ok`` (a 2xx in the end, retries included). Costs are
  *per answered request*: money spent on requests that failed raises the cost of those answered.
* **cost split** (USD, the cost model of :mod:`extproc.observability.cost_model`, per-token prices
  of the tiers in the configuration the gateway ran): every attempt that got a 2xx with ``usage``
  from an upstream call (``x-extproc-cache`` not a hit status) is priced at its tier
  (``x-extproc-tier``): ``prompt`` and ``completion`` for first attempts, ``retries`` for the
  client's retries (``x-stainless-retry-count`` > 0) whole. ``embeddings`` and ``overhead``
  (gateway time) are what the gateway itself booked during the run
  (``extproc_cost_usd_total{kind}``), as only it knows them. ``booked`` is everything the gateway
  booked, for comparison. Attempts the client abandoned (timeouts) have no ``usage``: they are
  not in the per-token cost, but their compute is in the GPU view.
* **GPU view**: busy seconds per model from the run's Triton metrics. Triton books a batch's
  compute time to every request of the batch, so ``C × E / I`` (compute µs × executions /
  inferences) is the time the device was busy (cost_model.py's docstring). The CPU reference
  tiers are decoupled models whose ``execute()`` only hands requests to their engine, so Triton's
  compute time is near zero for them; their engine's own busy time
  (``reference_llm_prefill_seconds_total + reference_llm_decode_seconds_total``) is used instead
  when they export it. GPU-hour cost = busy seconds / 3600 × ``gpu_hour_usd``.
* **inferences**: Triton's ``nv_inference_count`` minus the health-check generations Envoy sent
  (``envoy_cluster_health_check_success`` of the tier's cluster) during the run.
* **retries suppressed**: client retries (attempt number > 0) that the gateway answered without
  an upstream call (a cache hit, coalesced, or replayed for their idempotency key).
* **large share**: of the answered requests labelled ``difficulty: large``, those whose answer
  came from the ``large`` tier.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

from extproc.lab.runner import scrape
from extproc.lab.runner.records import HIT_STATUSES

COST_KINDS = ("prompt", "completion", "retries", "embeddings", "overhead")
DEFAULT_GPU_HOUR_USD = 2.5  #: the GPU view's price when the run does not say (an on-demand A10G-class hour)
_ENGINE_SECONDS = ("reference_llm_prefill_seconds_total", "reference_llm_decode_seconds_total")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; None without values."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _attempts(requests: Iterable[dict]):
    for request in requests:
        for attempt in request.get("attempts") or ():
            yield request, attempt


def _is_2xx(attempt: dict) -> bool:
    status = attempt.get("status")
    return status is not None and 200 <= status < 300 and not attempt.get("error")


def token_costs(requests: Sequence[dict], tiers: dict[str, dict]) -> tuple[dict[str, float], int]:
    """``({prompt, completion, retries}, unpriced)``: per-token cost of the upstream calls answered
    (see the module docstring); ``unpriced`` counts answers of a tier without per-token prices."""
    out = {"prompt": 0.0, "completion": 0.0, "retries": 0.0}
    unpriced = 0
    for _request, attempt in _attempts(requests):
        if not _is_2xx(attempt) or (attempt.get("headers") or {}).get("x-extproc-cache") in HIT_STATUSES:
            continue
        prompt, completion = attempt.get("prompt_tokens"), attempt.get("completion_tokens")
        if prompt is None and completion is None:
            continue
        price = tiers.get((attempt.get("headers") or {}).get("x-extproc-tier") or "")
        if price is None or price.get("gpu_hour_usd"):
            unpriced += 1
            continue
        p = (prompt or 0) * price.get("prompt_per_1k", 0.0) / 1000.0
        c = (completion or 0) * price.get("completion_per_1k", 0.0) / 1000.0
        if attempt.get("number", 0) > 0:
            out["retries"] += p + c
        else:
            out["prompt"] += p
            out["completion"] += c
    return out, unpriced


def cluster_model(cluster: str) -> str:
    """Envoy's cluster of a reference tier -> its Triton model (``tier_large`` -> ``llm-large``)."""
    return "llm-" + cluster.removeprefix("tier_")


def gpu_view(triton: dict[str, float] | None, envoy: dict[str, float] | None) -> dict[str, dict]:
    """Per model: ``inferences`` (health checks out), ``health_checks``, ``triton_busy_s`` (C×E/I),
    ``engine_busy_s`` (the reference tiers' own), ``busy_s`` (the one used)."""
    if triton is None:
        return {}
    checks = {cluster_model(c): v for c, v in
              scrape.by_label(envoy or {}, "envoy_cluster_health_check_success_total", "envoy_cluster_name").items()}
    models = set(scrape.by_label(triton, "nv_inference_count_total", "model"))
    for name in _ENGINE_SECONDS:
        models |= set(scrape.by_label(triton, name, "model"))
    out = {}
    for model in sorted(models):
        inferences = scrape.total(triton, "nv_inference_count_total", model=model)
        executions = scrape.total(triton, "nv_inference_exec_count_total", model=model)
        compute_us = scrape.total(triton, "nv_inference_compute_infer_duration_us_total", model=model)
        triton_busy = compute_us * executions / inferences / 1e6 if inferences else 0.0  # C × E / I
        engine_names = [n for n in _ENGINE_SECONDS if scrape.by_label(triton, n, "model").get(model) is not None]
        engine = sum(scrape.total(triton, n, model=model) for n in _ENGINE_SECONDS) if engine_names else None
        health = checks.get(model, 0.0)
        out[model] = {
            "inferences": max(0.0, inferences - health),
            "health_checks": health,
            "executions": executions,
            "triton_busy_s": triton_busy,
            "engine_busy_s": engine,
            "busy_s": engine if engine is not None else triton_busy,
        }
    return out


def summarise(requests: Sequence[dict], summary: dict) -> dict:
    """Every number of the report for one run (see the module docstring)."""
    prices = summary.get("prices") or {}
    tiers = prices.get("tiers") or {}
    gpu_hour_usd = prices.get("gpu_hour_usd") or DEFAULT_GPU_HOUR_USD
    metrics = summary.get("metrics") or {}
    gateway = (metrics.get("gateway") or {}).get("delta")
    triton = (metrics.get("triton") or {}).get("delta")
    envoy = (metrics.get("envoy") or {}).get("delta")

    n = len(requests)
    ok = [r for r in requests if r.get("outcome") == "ok"]
    errors = [r for r in requests if r.get("outcome") == "error"]
    unfinished = n - len(ok) - len(errors)
    answered = len(ok)
    attempts = [a for _r, a in _attempts(requests)]
    retry_attempts = [a for a in attempts if a.get("number", 0) > 0]

    costs, unpriced = token_costs(requests, tiers)
    booked = {k: scrape.total(gateway, "extproc_cost_usd_total", kind=k) for k in COST_KINDS} if gateway else {}
    costs["embeddings"] = booked.get("embeddings", 0.0)
    costs["overhead"] = booked.get("overhead", 0.0)
    total_usd = sum(costs[k] for k in COST_KINDS)

    gpu = gpu_view(triton, envoy)
    busy = sum(m["busy_s"] for m in gpu.values())

    finals = Counter((r.get("cache") or "none") for r in ok)
    tiers_seen = Counter((r.get("tier") or "none") for r in ok)
    large = [r for r in ok if r.get("difficulty") == "large"]
    cut_header = sum(int((a.get("headers") or {}).get("x-extproc-tokens-cut") or 0) for a in attempts
                     if str((a.get("headers") or {}).get("x-extproc-tokens-cut") or "0").isdigit())
    layers = {}
    if gateway:
        for layer in scrape.by_label(gateway, "extproc_cache_lookups_total", "layer"):
            results = scrape.by_label(gateway, "extproc_cache_lookups_total", "result", layer=layer)
            layers[layer] = {"lookups": sum(results.values()), "hits": results.get("hit", 0.0),
                             "hit_rate": _ratio(results.get("hit", 0.0), sum(results.values()))}

    wall = summary.get("wall_s") or 0.0
    duration = summary.get("duration_s") or 0.0
    out = {
        "mode": summary.get("mode"),
        "scale": summary.get("scale"),
        "workload": summary.get("workload"),
        "seed": summary.get("seed"),
        "requests": n,
        "answered": answered,
        "errors": len(errors),
        "unfinished": unfinished,
        "error_rate": _ratio(len(errors), answered + len(errors)),
        "error_kinds": dict(Counter((r["attempts"][-1].get("error") or f"http {r['attempts'][-1].get('status')}")
                                    for r in errors if r.get("attempts"))),
        "offered_rps": _ratio(n, duration),
        "throughput_rps": _ratio(answered, wall),
        "wall_s": wall,
        "latency_p50_s": percentile([r.get("latency_s") for r in ok], 50),
        "latency_p95_s": percentile([r.get("latency_s") for r in ok], 95),
        "ttft_p50_s": percentile([r.get("ttft_s") for r in ok], 50),
        "ttft_p95_s": percentile([r.get("ttft_s") for r in ok], 95),
        "stream_ttft_p95_s": percentile([r.get("ttft_s") for r in ok if r.get("stream")], 95),
        "send_lag_p95_s": percentile([r.get("send_lag_s") for r in requests], 95),
        "cost_usd": {k: costs[k] for k in COST_KINDS},
        "cost_total_usd": total_usd,
        "cost_per_request_usd": _ratio(total_usd, answered),
        "cost_split_per_request_usd": {k: _ratio(costs[k], answered) for k in COST_KINDS},
        "booked_by_gateway_usd": booked or None,
        "booked_per_request_usd": _ratio(sum(booked.values()), answered) if booked else None,
        "unpriced_answers": unpriced,
        "gpu": gpu,
        "gpu_seconds_total": busy,
        "gpu_seconds_per_request": _ratio(busy, answered),
        "gpu_hour_usd": gpu_hour_usd,
        "gpu_cost_per_request_usd": _ratio(busy / 3600.0 * gpu_hour_usd, answered),
        "prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in ok),
        "completion_tokens": sum(r.get("completion_tokens") or 0 for r in ok),
        "upstream_tokens": sum((a.get("prompt_tokens") or 0) + (a.get("completion_tokens") or 0) for a in attempts
                               if _is_2xx(a) and (a.get("headers") or {}).get("x-extproc-cache") not in HIT_STATUSES),
        "tokens_cut": scrape.total(gateway, "extproc_tokens_total", kind="cut") if gateway else float(cut_header),
        "cache_status_share": {k: v / answered for k, v in sorted(finals.items())} if answered else {},
        "cache_hit_rate": _ratio(sum(v for k, v in finals.items() if k in HIT_STATUSES), answered),
        "cache_layers": layers,
        "tier_mix": {k: v / answered for k, v in sorted(tiers_seen.items())} if answered else {},
        "attempts": len(attempts),
        "retries": len(retry_attempts),
        "timeouts": sum(1 for a in attempts if a.get("error") == "timeout"),
        "retries_suppressed": sum(1 for a in retry_attempts if _is_2xx(a)
                                  and (a.get("headers") or {}).get("x-extproc-cache") in HIT_STATUSES),
        "large_labelled": len(large),
        "large_share_on_large": _ratio(sum(1 for r in large if r.get("tier") == "large"), len(large)),
        "loadavg": summary.get("loadavg_after"),
    }
    if gateway:
        out["gateway_requests"] = scrape.by_label(gateway, "extproc_requests_total", "outcome")
        out["gateway_tokens"] = {k: scrape.total(gateway, "extproc_tokens_total", kind=k)
                                 for k in ("prompt", "completion", "saved", "cut")}
    return out


def compare(runs: Sequence[dict]) -> dict:
    """Naive against gateway per scale, and each mode's growth from its lowest scale to its highest."""
    by = {(r["mode"], r["scale"]): r for r in runs}
    scales = sorted({r["scale"] for r in runs if r["scale"] is not None})
    rows = []
    for scale in scales:
        naive, gw = by.get(("naive", scale)), by.get(("gateway", scale))
        if naive and gw:
            rows.append({"scale": scale,
                         "naive_cost_per_request_usd": naive["cost_per_request_usd"],
                         "gateway_cost_per_request_usd": gw["cost_per_request_usd"],
                         "gateway_over_naive": _ratio(gw["cost_per_request_usd"] or 0.0,
                                                      naive["cost_per_request_usd"] or 0.0),
                         "gpu_gateway_over_naive": _ratio(gw["gpu_cost_per_request_usd"] or 0.0,
                                                          naive["gpu_cost_per_request_usd"] or 0.0)})
    growth = {}
    for mode in sorted({r["mode"] for r in runs}):
        mine = sorted((r for r in runs if r["mode"] == mode and r["scale"] is not None), key=lambda r: r["scale"])
        if len(mine) >= 2:
            low, high = mine[0], mine[-1]
            growth[mode] = {"from_scale": low["scale"], "to_scale": high["scale"],
                            "cost_factor": _ratio(high["cost_per_request_usd"] or 0.0,
                                                  low["cost_per_request_usd"] or 0.0),
                            "gpu_cost_factor": _ratio(high["gpu_cost_per_request_usd"] or 0.0,
                                                      low["gpu_cost_per_request_usd"] or 0.0)}
    return {"by_scale": rows, "growth": growth}
