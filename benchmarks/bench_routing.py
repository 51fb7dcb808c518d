"""Model-tier routing: the added latency of the routing chain, and the learned router's quality.

    .venv/bin/python benchmarks/bench_routing.py [--requests 320] [--clients 1,16] [--holdout 0.25]

**Quality** (on the held-out part of ``extproc_plugins/routing/data/route_labelled.jsonl``, chosen by prompt hash,
never seen in training): a router is trained on the rest exactly as ``extproc router train
--holdout 0.25`` does, then judged on the held-out prompts -- the learned router alone, and the
whole default chain (rules + semantic routes + learned router) through the real lifecycle.
Target: >= 90 % of large-labelled prompts reach large while >= 50 % of all traffic goes to cheaper
tiers.

**Latency** of the request path in one worker (one event loop, like one ``extproc serve``
worker): the request-headers and request-body phases of the real
:class:`~extproc.framework.lifecycle.RequestLifecycle`, i.e. what Envoy waits for before it can send the
request upstream, for four chains:

* ``baseline``: ``model_tiers`` only (what routing costs nothing beyond);
* ``rules``: + ``route_rules`` (capabilities/context + 3 rules with token bounds and patterns);
* ``+semantic``: + ``semantic_routes`` (72 example utterances);
* ``+learned``: + ``learned_router`` (the default chain).

Each request is ``model: auto`` with a held-out prompt made unique (cell and counter appended) so
the per-process embedding cache never answers: every request pays for its embedding. At 16 clients
16 coroutines send at once; the embedding batcher then encodes several prompts per pass.
Added latency = chain p50/p99 minus baseline p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc_plugins.routing import router_model as rm  # noqa: E402
from extproc_plugins.routing import router_training  # noqa: E402
from extproc.framework.config import PluginEntry, load_config  # noqa: E402
from extproc.framework.gateway import Gateway  # noqa: E402

RULES = [{"name": "free_plan", "when": {"tenants": ["free"]}, "deny": ["large"]},
         {"name": "code", "when": {"patterns": ["```", r"\bdef \w+\(", r"stack ?trace"]}, "tier": "large"},
         {"name": "very_long", "when": {"min_prompt_tokens": 1500}, "tier": "large"}]


def chain(names: list[str], model_path: str) -> list[PluginEntry]:
    entries = []
    for name in names:
        settings = {}
        if name == "route_rules":
            settings = {"rules": RULES}
        elif name == "semantic_routes":
            settings = {"threshold": 0.5, "k": 3}
        elif name == "learned_router":
            settings = {"model_path": model_path}
        entries.append(PluginEntry(name=name, settings=settings, on_error="fail_closed"))
    return entries + [PluginEntry(name="model_tiers")]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


async def one_request(gateway, prompt: str) -> tuple[float, str | None]:
    body = json.dumps({"model": "auto", "max_tokens": 16, "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json",
               "content-length": str(len(body))}
    life = gateway.new_stream()
    t0 = time.perf_counter()
    await life.request_headers(headers, False)
    await life.request_body(body, True)
    elapsed = (time.perf_counter() - t0) * 1000.0
    tier = life.ctx.tier
    await life.stream_closed(True)
    return elapsed, tier


async def latency(config, prompts: list[str], n: int, clients: int, cell: str) -> dict:
    gateway = Gateway(config)
    await gateway.start()
    try:
        for i in range(20):  # warm-up: thread pool, tokenizer, BLAS
            await one_request(gateway, f"{prompts[i % len(prompts)]} (warm-up {cell} {i})")
        counter = iter(range(n))
        times: list[float] = []

        async def client():
            for i in counter:
                elapsed, _ = await one_request(gateway, f"{prompts[i % len(prompts)]} ({cell} #{i})")
                times.append(elapsed)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    finally:
        await gateway.stop()
    return {"p50": pct(times, 0.50), "p95": pct(times, 0.95), "p99": pct(times, 0.99),
            "mean": statistics.fmean(times), "rps": n / wall}


async def chain_quality(config, held) -> rm.EvalReport:
    gateway = Gateway(config)
    await gateway.start()
    try:
        routed = [(await one_request(gateway, item.prompt))[1] for item in held]
    finally:
        await gateway.stop()
    labels = list(rm.DEFAULT_LABELS)
    prices = {n: t.price for n, t in config.tiers.items()}
    return rm.evaluate(labels, [labels.index(i.tier) for i in held], [labels.index(t) for t in routed],
                       prices=prices, prompt_tokens=[router_training.chat_tokens(i.prompt) for i in held])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=320, help="requests per chain and client count")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--holdout", type=float, default=0.25)
    ap.add_argument("--strong-share", type=float, default=0.4)
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  (cores: {os.cpu_count()})")
    base = load_config(None)
    prices = {n: t.price for n, t in base.tiers.items()}
    data = rm.default_data_path()
    items = rm.load_labelled(data)
    train_items, held = rm.split_holdout(items, args.holdout)

    # ---- quality -------------------------------------------------------------------------
    t0 = time.perf_counter()
    result = router_training.train(data, prices=prices, holdout=args.holdout, strong_share=args.strong_share)
    print(f"\n== learned router: trained on {result.n_train} prompts, judged on {result.n_held_out} held-out "
          f"({args.holdout:.0%} by prompt hash), strong share {args.strong_share}  [{time.perf_counter() - t0:.1f}s]")
    print("thresholds: " + ", ".join(f"{k} {v:.3f}" for k, v in result.model.thresholds.items()))
    tmp = tempfile.mkdtemp(prefix="bench-routing-")
    model_path = os.path.join(tmp, "router.json")
    result.model.save(model_path)
    learned = router_training.evaluate(data, result.model, prices=prices, holdout=args.holdout)
    print("-- learned router alone, held-out:")
    print(learned.format())
    full = base.model_copy(update={"plugins": chain(["route_rules", "semantic_routes", "learned_router"], model_path)})
    chained = asyncio.run(chain_quality(full, held))
    print("-- whole default chain (rules + semantic routes + learned router), held-out, through the lifecycle:")
    print(chained.format())
    for name, rep in (("learned router", learned), ("default chain", chained)):
        ok = rep.strong_recall() >= 0.9 and rep.cheaper_share() >= 0.5
        print(f"target (large->large >= 90% and cheaper tiers >= 50%) for {name}: "
              f"{rep.strong_recall():.1%} / {rep.cheaper_share():.1%} -> {'MET' if ok else 'NOT MET'}")

    # ---- latency -------------------------------------------------------------------------
    prompts = [i.prompt for i in held]
    variants = [("baseline", []), ("rules", ["route_rules"]),
                ("+semantic", ["route_rules", "semantic_routes"]),
                ("+learned", ["route_rules", "semantic_routes", "learned_router"])]
    print(f"\n== request-path latency in one worker (headers + body phases), {args.requests} requests per cell, "
          f"unique prompts (no embedding cache hits)")
    print(f"{'chain':<11}{'clients':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>9}"
          f"{'added p50':>11}{'added p99':>11}")
    baseline: dict[int, dict] = {}
    for name, names in variants:
        config = base.model_copy(update={"plugins": chain(names, model_path)})
        for c in clients:
            r = asyncio.run(latency(config, prompts, args.requests, c, f"{name}/{c}"))
            if name == "baseline":
                baseline[c] = r
            b = baseline[c]
            print(f"{name:<11}{c:>8}{r['p50']:>9.2f}{r['p95']:>9.2f}{r['p99']:>9.2f}{r['rps']:>9.0f}"
                  f"{r['p50'] - b['p50']:>11.2f}{r['p99'] - b['p99']:>11.2f}", flush=True)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
