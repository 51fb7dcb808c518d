"""What the metrics + usage_records plugins add per request, measured in-process on the real lifecycle.

    .venv/bin/python benchmarks/bench_observability.py [--requests 4000] [--rounds 8] [--in-memory]

Two gateways run the same requests through every ext_proc phase (``extproc.framework.testing.GatewayHarness``,
a canned Triton answer, no network): *base* loads ``model_tiers`` only; *observed* adds
``usage_records`` (file sink in a temp dir, background flush every second) and ``metrics``, last,
as in the default configuration. Requests are timed one by one, in alternating rounds so load from
other processes falls on both alike; the figure is the difference of the p50s. The plugins' own
hook time (``ctx.timings_ms['plugin:...']``, p50) is printed too, and the cost of the timing
instrumentation the lifecycle now always does.

By default Prometheus runs in multiprocess mode (mmap files, as under ``extproc serve
--metrics-port``); ``--in-memory`` measures the single-process mode.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--requests", type=int, default=4000, help="requests per gateway per round")
parser.add_argument("--rounds", type=int, default=8)
parser.add_argument("--stream", action="store_true", help="streamed answers (5 SSE chunks) instead of JSON")
parser.add_argument("--in-memory", action="store_true", help="prometheus_client without multiprocess mode")
args = parser.parse_args()

work = tempfile.mkdtemp(prefix="bench-observability-")
if not args.in_memory:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(work, "prom")
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"])

import yaml  # noqa: E402  (after PROMETHEUS_MULTIPROC_DIR: prometheus_client reads it on import)

from extproc.framework.config import default_config_text, parse_config  # noqa: E402
from extproc.framework.testing import GatewayHarness  # noqa: E402


def config(observed: bool):
    data = yaml.safe_load(default_config_text())
    data["plugins"] = [{"name": "model_tiers"}]
    if observed:
        data["plugins"] += [
            {"name": "usage_records", "on_error": "fail_open",
             "settings": {"path": os.path.join(work, "usage.jsonl")}},
            {"name": "metrics", "on_error": "fail_open", "settings": {"tenants": ["acme"]}},
        ]
    return parse_config(data)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_round(gw, n, out, plugin_times):
    answer = "one two three four five"
    for i in range(n):
        start = time.perf_counter()
        result = await gw.chat("hello there", model="small", stream=args.stream, answer=answer)
        out.append((time.perf_counter() - start) * 1e6)
        for key in ("plugin:metrics", "plugin:usage_records"):
            if key in result.ctx.timings_ms:
                plugin_times.setdefault(key, []).append(result.ctx.timings_ms[key] * 1000)
        if result.status != 200:
            raise SystemExit(f"request failed: {result.status} {result.body[:200]!r}")


def instrumentation_cost(n=200_000) -> float:
    """µs for one timing record (perf_counter twice, a dict update), as _timed and HookRunner do."""
    timings: dict[str, float] = {}
    perf = time.perf_counter
    start_all = perf()
    for _ in range(n):
        start = perf()
        timings["k"] = timings.get("k", 0.0) + (perf() - start) * 1000.0
    return (perf() - start_all) / n * 1e6


async def main():
    times = {"base": [], "observed": []}
    plugin_times: dict[str, list[float]] = {}
    async with GatewayHarness(config=config(False)) as base, GatewayHarness(config=config(True)) as observed:
        for gw in (base, observed):  # warm up: imports, tokenizer, metric children
            await run_round(gw, 200, [], {})
        for r in range(args.rounds):
            order = [("base", base), ("observed", observed)] if r % 2 == 0 else [("observed", observed), ("base", base)]
            for name, gw in order:
                await run_round(gw, args.requests, times[name], plugin_times)
    timed_records = sum(1 for _ in open(os.path.join(work, "usage.jsonl"), "rb"))  # flushed on shutdown
    b50, o50 = pct(times["base"], 0.5), pct(times["observed"], 0.5)
    print(f"mode: prometheus {'in-memory' if args.in_memory else 'multiprocess (mmap)'}, "
          f"{'streamed (5 chunks)' if args.stream else 'JSON'} answers, "
          f"{args.rounds} rounds x {args.requests} requests per gateway; load average {os.getloadavg()[0]:.2f}")
    for name in ("base", "observed"):
        t = times[name]
        print(f"  {name:9s} p50 {pct(t, 0.5):7.1f} us   p90 {pct(t, 0.9):7.1f} us   p99 {pct(t, 0.99):7.1f} us   "
              f"mean {statistics.fmean(t):7.1f} us")
    print(f"added by metrics + usage_records: p50 {o50 - b50:+.1f} us per request "
          f"({(o50 - b50) / 1000:+.4f} ms; target < 0.1 ms)")
    for key, values in sorted(plugin_times.items()):
        print(f"  {key} hook time: p50 {pct(values, 0.5):.1f} us, p99 {pct(values, 0.99):.1f} us")
    print(f"usage records written to the file: {timed_records}")
    print(f"timing instrumentation (lifecycle phases + HookRunner): {instrumentation_cost():.2f} us per record")


asyncio.run(main())
sys.exit(0)
