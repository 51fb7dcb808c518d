"""The embedder model behind a real tritonserver: same vectors as MiniLMEncoder in-process."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from extproc.embeddings.encoder import MiniLMEncoder, ModelNotFoundError  # noqa: E402
from tests.conftest import require  # noqa: E402

TEXTS = [
    "How do I reset my password?",
    "I forgot my login credentials and need to change them.",
    "Café au lait, naïve résumé — ÜBER straße.",
    "東京は日本の首都です。 🚀",
    "",
    " ".join(["long input past the token limit"] * 80),
]


@pytest.fixture(scope="module")
def encoder():
    try:
        return MiniLMEncoder.from_package()
    except ModelNotFoundError as exc:
        require(False, str(exc))


@pytest.fixture(scope="module")
def embedder_triton(tmp_path_factory, encoder):
    try:
        from extproc.commands.tritonserver import TritonProcess, find_tritonserver, free_port

        find_tritonserver()
    except (ImportError, RuntimeError) as exc:
        require(False, f"tritonserver unavailable: {exc}")
    proc = TritonProcess(
        REPO / "triton_models",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        work_dir=tmp_path_factory.mktemp("triton-embedder"),
        models=["embedder"],
    )
    proc.start()
    try:
        proc.wait_ready(timeout=120)
        yield proc
    finally:
        proc.stop()


def _infer(triton, texts: list[str]) -> np.ndarray:
    body = {
        "inputs": [{"name": "text", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}],
        "outputs": [{"name": "embedding"}],
    }
    req = urllib.request.Request(
        f"{triton.http_url}/v2/models/embedder/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"HTTP {e.code}: {e.read().decode()}") from None
    (emb,) = [o for o in out["outputs"] if o["name"] == "embedding"]
    assert emb["datatype"] == "FP32" and emb["shape"] == [len(texts), 384]
    return np.asarray(emb["data"], dtype=np.float32).reshape(len(texts), 384)


def test_config_as_served(embedder_triton):
    with urllib.request.urlopen(f"{embedder_triton.http_url}/v2/models/embedder/config", timeout=10) as r:
        cfg = json.loads(r.read())
    assert cfg["max_batch_size"] == 64
    as_rows = lambda ts: [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in ts]  # noqa: E731
    assert as_rows(cfg["input"]) == [("text", "TYPE_STRING", [1])]
    assert as_rows(cfg["output"]) == [("embedding", "TYPE_FP32", [384])]
    assert cfg["backend"] == "python"


def test_served_vectors_equal_in_process(embedder_triton, encoder):
    served = _infer(embedder_triton, TEXTS)
    local = encoder.encode(TEXTS)
    assert np.abs(served - local).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


def test_concurrent_requests_are_batched_and_correct(embedder_triton, encoder):
    texts = [f"request number {i}: {TEXTS[i % 4]}" for i in range(48)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        served = list(pool.map(lambda t: _infer(embedder_triton, [t])[0], texts))
    local = encoder.encode(texts)
    assert np.abs(np.stack(served) - local).max() < 1e-5

    # The dynamic batcher merged some of them (executions < requests), as the metrics show.
    import asyncio

    from extproc.observability.triton_metrics import TritonMetricsClient

    loads = asyncio.run(TritonMetricsClient(embedder_triton.metrics_url, max_age=0).snapshot())
    emb = loads["embedder"]
    assert emb.success >= 49 and emb.inference_count >= 48 + len(TEXTS)
    assert emb.exec_count < emb.inference_count and emb.avg_batch > 1.0
    assert emb.pending == 0


def test_the_gateways_client_gets_the_in_process_vectors(embedder_triton, encoder):
    """extproc.embeddings.triton_client (binary output, one infer per batch): the same vectors as
    the worker's own encoder, long and non-ASCII texts included."""
    import asyncio

    from extproc.embeddings.triton_client import TritonEmbeddingClient

    texts = TEXTS + ["Ελληνικά και العربية και עברית", "tab\tand\nnewline \"quoted\" \\ back", "x" * 2000]
    client = TritonEmbeddingClient(embedder_triton.http_url, timeout=30)
    served = asyncio.run(client.embed(texts))
    local = encoder.encode(texts)
    assert served.shape == (len(texts), 384) and served.dtype == np.float32
    cosines = np.sum(served * local, axis=1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(local, axis=1))
    assert cosines.min() > 0.99999
    assert np.abs(served - local).max() < 1e-5


def test_prompt_embedder_on_triton_batches_concurrent_prompts(embedder_triton, encoder):
    import asyncio

    from extproc.embeddings import prompt as prompts
    from extproc.embeddings.triton_client import TritonEmbeddingClient

    embedder = prompts.PromptEmbedder(triton=TritonEmbeddingClient(embedder_triton.http_url, timeout=30),
                                      on_unavailable="fail")
    texts = [f"concurrent prompt {i}: {TEXTS[i % 4]}" for i in range(24)]

    async def run():
        return await asyncio.gather(*(embedder.batcher.encode_traced(t) for t in texts))

    results = asyncio.run(run())
    assert {source for _, source in results} == {"triton"}
    assert embedder.batcher.batches < len(texts)  # concurrent asks went together
    assert np.abs(np.stack([v for v, _ in results]) - encoder.encode(texts)).max() < 1e-5
    assert embedder.texts == {"local": 0, "triton": len(texts), "local_fallback": 0}


def test_the_model_runs_one_blas_thread(embedder_triton):
    assert "blas_threads=1" in embedder_triton.log_tail(400) or "blas_threads=as the environment says" in \
        embedder_triton.log_tail(400)
