#!/usr/bin/env python3
"""MiniLM embedding cost per runtime, in process, one thread: NumPy vs ONNX Runtime fp32 vs int8.

    python benchmarks/bench_encoder_runtimes.py [--runtimes numpy,onnxruntime,onnxruntime-int8]
                                                [--batches 1,8,16] [--seconds 3] [--drift-texts 600]

For each runtime and batch size: CPU ms per batch and per prompt (``time.process_time``, median of
repeated calls over distinct texts), for a short prompt (~20 tokens) and the prompts
``bench_auto_routing.py`` sends (~29 tokens: a question plus a run tag and counter). BLAS and ONNX
Runtime run on one thread, as in a gateway worker. Then each ONNX runtime's drift from NumPy's
vectors: cosine over ``--drift-texts`` varied texts (``benchmarks/data/semantic_pairs.jsonl`` and
``semantic_dev``), min / 1st percentile / mean. Not run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc.embeddings import encoder as encoders  # noqa: E402

SHORT = ["What is the capital of Australia and why was it chosen?", "Write a haiku about autumn rain in the city",
         "How do I reverse a linked list in place in Python?", "Give me three names for a small family bakery"]
AUTO = ["Summarise the plot of a novel about a lighthouse keeper", "Prove that the square root of two is irrational",
        "Explain how a hash map handles collisions, with trade-offs", "Translate 'good morning, how are you' into Spanish"]
DATA = [ROOT / "benchmarks" / "data" / "semantic_pairs.jsonl", ROOT / "benchmarks" / "data" / "semantic_dev" / "pairs.jsonl"]


def texts_of(kind: str, n: int) -> list[str]:
    if kind == "short":
        return [f"{SHORT[i % len(SHORT)]} ({i})" for i in range(n)]
    return [f"{AUTO[i % len(AUTO)]} (local c16 {1765100000000000000 + i} request {i})" for i in range(n)]


def cpu_ms_per_batch(encode, texts: list[str], batch: int, seconds: float) -> float:
    encode(texts[:batch])
    samples, start, i = [], time.monotonic(), 0
    while time.monotonic() - start < seconds or len(samples) < 5:
        chunk = [texts[(i + j) % len(texts)] for j in range(batch)]
        t0 = time.process_time()
        encode(chunk)
        samples.append((time.process_time() - t0) * 1000)
        i += batch
    return statistics.median(samples)


def drift_texts(n: int) -> list[str]:
    out: list[str] = []
    for path in DATA:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out += [row["a"], row["b"]]
    return list(dict.fromkeys(out))[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtimes", default="numpy,onnxruntime,onnxruntime-int8")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per case")
    ap.add_argument("--drift-texts", type=int, default=600)
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    runtimes = [r.strip() for r in args.runtimes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    encs = {}
    for r in runtimes:
        t0 = time.perf_counter()
        encs[r] = encoders.build_encoder(encoders.resolve_runtime(r))
        print(f"{r}: loaded in {time.perf_counter() - t0:.2f} s", flush=True)
    print(f"load average {os.getloadavg()}")
    for kind in ("short", "auto"):
        sample = texts_of(kind, 64)
        tokens = int(encs[runtimes[0]].tokenize(sample[:1])[1].sum())
        print(f"\n{kind} prompts ({tokens} tokens, e.g. {sample[0]!r})")
        print(f"{'batch':>5}  " + "  ".join(f"{r:>24}" for r in runtimes))
        for b in batches:
            row = []
            for r in runtimes:
                ms = cpu_ms_per_batch(encs[r]._encode_batch, sample, b, args.seconds)
                row.append(f"{ms:7.2f} ms ({ms / b:5.2f}/prompt)")
            print(f"{b:>5}  " + "  ".join(f"{c:>24}" for c in row), flush=True)
    print(f"load average {os.getloadavg()}")
    if "numpy" in encs and args.drift_texts:
        texts = drift_texts(args.drift_texts)
        ref = encs["numpy"].encode(texts)
        for r, enc in encs.items():
            if r == "numpy":
                continue
            got = enc.encode(texts)
            cos = (got.astype(np.float64) * ref).sum(axis=1)
            print(f"drift {r} vs numpy over {len(texts)} texts: cosine min {cos.min():.6f} p1 "
                  f"{np.percentile(cos, 1):.6f} mean {cos.mean():.6f}; max abs diff {np.abs(got - ref).max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
