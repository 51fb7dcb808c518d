"""Semantic cache precision through the real decision path, on the development and held-out sets.

    python benchmarks/bench_semantic_cache_precision.py [--sets dev heldout] [--threshold T] [--out f.json]
    python benchmarks/bench_semantic_cache_precision.py --set-dir PATH [--name NAME] [--set-dir PATH2 ...]

Data: ``benchmarks/data/semantic_dev/*.jsonl`` (written to tune the guard) and
``benchmarks/data/semantic_heldout/*.jsonl`` (written by someone else; measured once on guard
ce91f42, development data since), or any folder of such files given with ``--set-dir`` (a new
held-out set: no code change needed; ``--name`` labels it in the output and in ``--out``).
Each line: ``{"id", "a", "b", "same": bool, "kind", "note"}``.

For every pair the benchmark runs the real gateway in process (:class:`GatewayHarness` with the
``semantic_cache`` policy, memory state, the default settings unless ``--threshold``): it sends ``a``
(answered by the fake upstream, stored), then ``b`` in the same scope; ``b`` is a hit when the gateway
answers it from the semantic cache (``x-extproc-cache: semantic_hit``). Each pair has its own scope
(a system prompt naming the pair), so pairs never see each other's entries. So a hit is exactly
what a user would get: encoder, normalisation, index threshold, lexicon guard, alignment and span
embeddings.

Prints per set: pairs, precision of hits, hit rate on paraphrases, false-hit rate per kind of near
miss, each with a 95 % Wilson interval; which check rejected the near misses above the threshold;
and the verification's cost (per candidate, p50/p99: the pure alignment, and the whole verification
with the spans' embeddings computed, not cached).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc.embeddings.prompt import EmbeddingCache  # noqa: E402
from extproc.framework.config import load_config  # noqa: E402
from extproc.framework.testing import GatewayHarness  # noqa: E402
from extproc_plugins.caching.semantic_cache import SemanticCache  # noqa: E402
from extproc_plugins.caching.semantic_guard import features  # noqa: E402
from extproc_plugins.caching.semantic_verify import structure, tokens  # noqa: E402

DATA = ROOT / "benchmarks" / "data"
SETS = {"dev": DATA / "semantic_dev", "heldout": DATA / "semantic_heldout"}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def load(folder: Path) -> list[dict]:
    pairs = []
    for f in sorted(folder.glob("*.jsonl")):
        pairs += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return pairs


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def run_set(pairs: list[dict], settings: dict) -> dict:
    config = load_config(None, overrides={"plugins": [{"name": "model_tiers"}], "state": {"redis_url": None}})
    results = []
    async with GatewayHarness(SemanticCache, settings=settings, config=config) as gw:
        plugin = next(p.obj for p in gw.gateway.hooks.plugins if p.name == "SemanticCache")
        for i, p in enumerate(pairs):
            system = f"benchmark pair {i}"
            body = {"model": "auto", "temperature": 0, "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": p["a"]}]}
            await gw.send(body, answer="stored answer")
            body["messages"][1]["content"] = p["b"]
            r = await gw.send(body, answer="fresh answer")
            hit = r.replied and r.headers.get("x-extproc-cache") == "semantic_hit"
            lookups = [res for layer, res in r.ctx.cache_lookups if layer == "semantic"]
            results.append((p, hit, lookups[-1] if lookups else ""))
        # cost of the verification, on the candidates the index returned (cosine >= threshold)
        candidates = [p for p, _hit, res in results if res in ("hit", "guard_rejected")]
        pure, full, spanned = [], [], []
        reasons = Counter()
        for p in candidates:
            tokens.cache_clear()
            t0 = time.perf_counter()
            structure(p["a"], p["b"])
            pure.append((time.perf_counter() - t0) * 1e6)
            plugin.encoder.cache = EmbeddingCache()  # the spans' embeddings computed, not cached
            tokens.cache_clear()
            features.cache_clear()
            t0 = time.perf_counter()
            ok, why = await plugin.verify(p["a"], p["b"])
            full.append((time.perf_counter() - t0) * 1e6)
            if len(plugin.encoder.cache):
                spanned.append(full[-1])
            if not p["same"] and not ok:
                reasons[why] += 1
    return {"results": results, "pure_us": pure, "full_us": full, "spanned_us": spanned,
            "reasons": reasons, "candidates": len(candidates)}


def report(name: str, pairs: list[dict], run: dict, threshold: float) -> dict:
    res = run["results"]
    tp = sum(1 for p, hit, _ in res if hit and p["same"])
    fp = sum(1 for p, hit, _ in res if hit and not p["same"])
    pos = sum(1 for p in pairs if p["same"])
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p, hit, _ in res:
        if not p["same"]:
            per_kind[p["kind"]][1] += 1
            per_kind[p["kind"]][0] += hit
    prec = tp / (tp + fp) if tp + fp else 1.0
    lo, hi = wilson(tp, tp + fp)
    hlo, hhi = wilson(tp, pos)
    print(f"\n== {name}: {len(pairs)} pairs ({pos} paraphrases, {len(pairs) - pos} near misses), threshold {threshold}")
    print(f"precision of hits {prec:.3f} [{lo:.3f}, {hi:.3f}]  ({tp} right, {fp} wrong of {tp + fp} hits)")
    print(f"hit rate on paraphrases {tp / pos if pos else 0:.3f} [{hlo:.3f}, {hhi:.3f}]  ({tp} of {pos})")
    print("false-hit rate per kind of near miss:")
    kinds = {}
    for k, (h, n) in sorted(per_kind.items()):
        klo, khi = wilson(h, n)
        kinds[k] = {"false_hits": h, "pairs": n, "rate": h / n, "ci95": [klo, khi]}
        print(f"  {k:<20} {h:>3} / {n:<3} {h / n:.3f} [{klo:.3f}, {khi:.3f}]")
    nm = len(pairs) - pos
    flo, fhi = wilson(fp, nm)
    print(f"  {'all near misses':<20} {fp:>3} / {nm:<3} {fp / nm if nm else 0:.3f} [{flo:.3f}, {fhi:.3f}]")
    wrong = [(p["kind"], p["a"], p["b"]) for p, hit, _ in res if hit and not p["same"]]
    for kind, a, b in wrong:
        print(f"    false hit ({kind}): {a!r} -> {b!r}")
    print("near misses above the threshold rejected by: "
          + ", ".join(f"{k} {v}" for k, v in run["reasons"].most_common()))
    pure, full = run["pure_us"], run["full_us"]
    print(f"verification cost per candidate ({run['candidates']} candidates): alignment only p50 "
          f"{_pct(pure, .5):.0f} us p99 {_pct(pure, .99):.0f} us; whole verification (lexicon guard + "
          f"alignment + span embeddings, uncached) p50 {_pct(full, .5) / 1000:.2f} ms p99 {_pct(full, .99) / 1000:.2f} ms;"
          f" the {len(run['spanned_us'])} that embedded spans p50 {_pct(run['spanned_us'], .5) / 1000:.2f} ms"
          f" p99 {_pct(run['spanned_us'], .99) / 1000:.2f} ms")
    return {"pairs": len(pairs), "paraphrases": pos, "precision": prec, "precision_ci95": [lo, hi],
            "hit_rate": tp / pos if pos else 0.0, "hit_rate_ci95": [hlo, hhi], "false_hits": fp,
            "per_kind": kinds, "rejected_by": dict(run["reasons"]),
            "cost_us": {"align_p50": _pct(pure, .5), "align_p99": _pct(pure, .99),
                        "verify_p50": _pct(full, .5), "verify_p99": _pct(full, .99),
                        "with_spans_n": len(run["spanned_us"]), "with_spans_p50": _pct(run["spanned_us"], .5),
                        "with_spans_p99": _pct(run["spanned_us"], .99)},
            "wrong": wrong}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=None, choices=sorted(SETS),
                    help="the sets in benchmarks/data/ (default: both, unless --set-dir is given)")
    ap.add_argument("--set-dir", type=Path, action="append", default=[],
                    help="a folder of *.jsonl pairs to measure (repeatable)")
    ap.add_argument("--name", action="append", default=[],
                    help="a label for each --set-dir, in order (default: the folder's name)")
    ap.add_argument("--threshold", type=float, default=SemanticCache.Settings().threshold)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    settings = {"threshold": args.threshold, "reuse_embeddings": False}
    out = {"threshold": args.threshold, "guard": SemanticCache.Settings().guard.model_dump()}
    chosen = [(n, SETS[n]) for n in (args.sets if args.sets is not None else ([] if args.set_dir else sorted(SETS)))]
    for i, folder in enumerate(args.set_dir):
        if not folder.is_dir():
            ap.error(f"--set-dir {folder}: not a folder")
        chosen.append((args.name[i] if i < len(args.name) else folder.name, folder))
    for name, folder in chosen:
        pairs = load(folder)
        if not pairs:
            print(f"\n== {name}: no pairs in {folder}")
            continue
        t0 = time.perf_counter()
        run = asyncio.run(run_set(pairs, settings))
        out[name] = report(name, pairs, run, args.threshold)
        print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
