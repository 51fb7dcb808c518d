"""Semantic cache precision and hit rate on labelled paraphrase / near-miss pairs.

    python benchmarks/bench_semantic_precision.py [--threshold 0.85] [--out precision.json]

Data: ``benchmarks/data/semantic_pairs.jsonl`` (337 pairs: 151 paraphrases, 186 near misses:
another entity, another number, a negation, an opposite word or direction, a neighbouring topic),
written for this benchmark, and ``semantic_pairs_holdout.jsonl`` (102 pairs written afterwards and
not used to choose the threshold or the guard's rules). Texts are normalised and embedded exactly
as the semantic cache does (``extproc_plugins.caching.cache_keys.normalize_text``, all-MiniLM-L6-v2).

Two ways of asking "would the cache answer b with a's answer?":

* **pairwise**: store ``a``, look up ``b``: a hit when cosine >= threshold and (with the guard) the
  guard passes. Precision = hits on paraphrase pairs / all hits; hit rate = hits on paraphrase
  pairs / paraphrase pairs.
* **index**: store every distinct ``a`` in one scope, look up every ``b`` against all of them (top
  candidates in order, first one that passes, as the policy does). A hit is correct only when the
  entry found is labelled a paraphrase of ``b``; this also counts the wrong-neighbour hits that
  pairwise cannot see.

It prints a threshold sweep with and without the guard, what each guard check buys (precision and
hit rate with that check alone switched off), and the figures per kind of pair.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc_plugins.caching.cache_keys import normalize_text  # noqa: E402
from extproc.embeddings.encoder import get_encoder  # noqa: E402
from extproc_plugins.caching.semantic_guard import GuardChecks, compatible  # noqa: E402

DATA = ROOT / "benchmarks" / "data"
OFF = GuardChecks(False, False, False, False, False)


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def pairwise(pairs, scores, threshold, checks):
    tp = fp = 0
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # kind -> [hits, pairs]
    for p, s in zip(pairs, scores):
        hit = s >= threshold and (checks == OFF or compatible(normalize_text(p["a"]), normalize_text(p["b"]), checks)[0])
        per_kind[p["kind"]][1] += 1
        if hit:
            per_kind[p["kind"]][0] += 1
            if p["same"]:
                tp += 1
            else:
                fp += 1
    positives = sum(p["same"] for p in pairs)
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "hit_rate": tp / positives, "hits": tp + fp,
            "false_hits": fp, "per_kind": {k: v[0] / v[1] for k, v in per_kind.items()}}


def index_mode(pairs, vec, threshold, checks, k=4):
    stored = sorted({p["a"] for p in pairs})
    matrix = np.stack([vec[a] for a in stored])
    right = defaultdict(set)
    for p in pairs:
        if p["same"]:
            right[p["b"]].add(p["a"])
    queries = sorted({p["b"] for p in pairs})
    tp = fp = 0
    for b in queries:
        scores = matrix @ vec[b]
        for i in np.argsort(-scores)[:k]:
            if scores[i] < threshold:
                break
            a = stored[i]
            if a == b:
                continue
            if checks != OFF and not compatible(normalize_text(a), normalize_text(b), checks)[0]:
                continue
            if a in right[b]:
                tp += 1
            else:
                fp += 1
            break
    want = sum(1 for b in queries if right[b])
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "hit_rate": tp / want, "hits": tp + fp,
            "false_hits": fp, "queries": len(queries)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threshold", type=float, default=0.85, help="the semantic cache's default")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    dev, holdout = load("semantic_pairs.jsonl"), load("semantic_pairs_holdout.jsonl")
    encoder = get_encoder()
    texts = sorted({normalize_text(t) for p in dev + holdout for t in (p["a"], p["b"])})
    t0 = time.perf_counter()
    matrix = encoder.encode(texts)
    print(f"embedded {len(texts)} texts in {time.perf_counter() - t0:.1f}s (all-MiniLM-L6-v2, NumPy)")
    by_text = dict(zip(texts, matrix))
    vec = {t: by_text[normalize_text(t)] for p in dev + holdout for t in (p["a"], p["b"])}
    out: dict = {"threshold": args.threshold}

    for name, pairs in (("dev", dev), ("holdout", holdout)):
        scores = np.array([float(vec[p["a"]] @ vec[p["b"]]) for p in pairs])
        kinds = defaultdict(int)
        for p in pairs:
            kinds[p["kind"]] += 1
        print(f"\n== {name}: {len(pairs)} pairs ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})")
        print(f"{'threshold':>9} | {'cosine only: precision  hit rate':>33} | {'+ guard: precision  hit rate':>29}")
        sweep = {}
        for thr in (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.96):
            raw, guarded = pairwise(pairs, scores, thr, OFF), pairwise(pairs, scores, thr, GuardChecks())
            sweep[thr] = {"cosine_only": raw, "guard": guarded}
            mark = "  <- default" if abs(thr - args.threshold) < 1e-9 else ""
            print(f"{thr:>9.2f} | {raw['precision']:>20.3f} {raw['hit_rate']:>9.3f} ({raw['false_hits']:>2} false) |"
                  f" {guarded['precision']:>15.3f} {guarded['hit_rate']:>9.3f} ({guarded['false_hits']} false){mark}")
        at = pairwise(pairs, scores, args.threshold, GuardChecks())
        print(f"at {args.threshold}: hits per kind of pair (paraphrase = hit rate, others = false-hit rate): "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(at["per_kind"].items())))
        ablation = {}
        print(f"guard checks at {args.threshold}, each switched off alone:")
        for f in fields(GuardChecks):
            r = pairwise(pairs, scores, args.threshold, GuardChecks(**{f.name: False}))
            ablation[f.name] = r
            print(f"  without {f.name:<9} precision {r['precision']:.3f}  hit rate {r['hit_rate']:.3f}"
                  f"  ({r['false_hits']} false hits)")
        idx_raw = index_mode(pairs, vec, args.threshold, OFF)
        idx = index_mode(pairs, vec, args.threshold, GuardChecks())
        print(f"index mode at {args.threshold} ({idx['queries']} lookups against every stored question): "
              f"cosine only precision {idx_raw['precision']:.3f} hit rate {idx_raw['hit_rate']:.3f}; "
              f"+ guard precision {idx['precision']:.3f} hit rate {idx['hit_rate']:.3f} "
              f"({idx['false_hits']} false hits)")
        out[name] = {"sweep": {str(k): v for k, v in sweep.items()}, "ablation": ablation,
                     "index_cosine_only": idx_raw, "index_guard": idx}
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
