#!/usr/bin/env python3
"""Do the embedding runtimes route the same? ``model: auto`` decisions per runtime, compared to NumPy's.

    python benchmarks/bench_encoder_decisions.py [--runtimes numpy,onnxruntime,onnxruntime-int8] [--texts 800]

For each runtime (``$EXTPROC_EMBEDDINGS_RUNTIME``, one process each): the real gateway in process
(:class:`GatewayHarness`) with ``route_rules``, ``semantic_routes`` (threshold 0.5, k 3, as
``bench_auto_routing.py``), ``learned_router`` and ``model_tiers``, route memos off, routes
``--texts`` distinct texts of ``benchmarks/data/semantic_pairs.jsonl`` and ``semantic_dev``. Prints
how many chosen tiers, and deciding policies, differ from NumPy's. The semantic cache's side is
``bench_semantic_cache_precision.py --sets dev`` run with each runtime. Not run by the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIERS = {n: {"model": "stub-model", "kind": "openai", "aliases": [], "default_max_tokens": 16}
         for n in ("small", "medium", "large")}
CONFIG = {"tiers": TIERS, "default_tier": "small", "state": {"redis_url": None}, "plugins": [
    {"name": "route_rules"},
    {"name": "semantic_routes", "settings": {"threshold": 0.5, "k": 3, "memo_entries": 0}},
    {"name": "learned_router", "settings": {"memo_entries": 0}},
    {"name": "model_tiers"}]}


async def decide(items: list[str]) -> dict[str, list[str]]:
    sys.path.insert(0, str(ROOT))
    from extproc.framework.testing import GatewayHarness

    out = {}
    async with GatewayHarness(config=CONFIG) as gw:
        for t in items:
            r = await gw.chat(t, answer="ok")
            out[t] = [r.ctx.tier, r.ctx.tier_reason]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtimes", default="numpy,onnxruntime,onnxruntime-int8")
    ap.add_argument("--texts", type=int, default=800)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: decide in this process, write JSON here
    args = ap.parse_args(argv)
    from bench_encoder_runtimes import drift_texts  # the same distinct texts the drift is measured on

    items = drift_texts(args.texts)
    if args.one:
        Path(args.one).write_text(json.dumps(asyncio.run(decide(items))))
        return 0
    runtimes = [r.strip() for r in args.runtimes.split(",")]
    if runtimes[0] != "numpy":
        runtimes.insert(0, "numpy")
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for r in runtimes:
            out = Path(work) / f"{r}.json"
            subprocess.run([sys.executable, __file__, "--texts", str(args.texts), "--one", str(out)], check=True,
                           env={**os.environ, "EXTPROC_EMBEDDINGS_RUNTIME": r}, stdout=subprocess.DEVNULL)
            results[r] = json.loads(out.read_text())
    ref = results["numpy"]
    print(f"{len(ref)} texts; numpy's tiers: {dict(Counter(v[0] for v in ref.values()))}")
    for r in runtimes[1:]:
        got = results[r]
        tiers = [t for t in ref if ref[t][0] != got[t][0]]
        reasons = [t for t in ref if ref[t][1] != got[t][1]]
        print(f"{r}: tier differs on {len(tiers)} of {len(ref)}, deciding policy on {len(reasons)}")
        for t in tiers[:5]:
            print(f"    {t[:60]!r}: numpy {ref[t][0]} ({ref[t][1]}), {r} {got[t][0]} ({got[t][1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
