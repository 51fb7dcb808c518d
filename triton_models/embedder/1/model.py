"""embedder: all-MiniLM-L6-v2 sentence embeddings (Triton Python backend).

Input ``text`` STRING [1] per item, output ``embedding`` FP32 [384] (mean pooling + L2 norm,
same vectors as sentence-transformers).  The dynamic batcher hands several requests to one
``execute``; all their texts go through the encoder together.  The config parameter ``runtime``
(default ``auto``: ONNX Runtime when installed, else NumPy; the same vectors) picks the encoder
as the gateway's ``embeddings.runtime`` does; ``blas_threads`` (default 1, ``auto``: the library's choice) sets the BLAS pool, as the LLM tiers
do (reference_llm/blas_threads.py); an explicit ``OPENBLAS_NUM_THREADS`` wins.
"""

import json
import os
import sys
from pathlib import Path


def _extend_sys_path() -> None:
    # The Python backend stub ignores PYTHONPATH: extproc.commands.tritonserver exports the venv's
    # site-packages (and the repository) in EXTPROC_TRITON_SYS_PATH.  The project root (which
    # holds the extproc package) is added too, found from this file's location.
    entries = [p for p in os.environ.get("EXTPROC_TRITON_SYS_PATH", "").split(os.pathsep) if p]
    root = Path(__file__).resolve().parents[3]
    if (root / "extproc" / "embeddings" / "encoder.py").is_file():
        entries.append(str(root))
    for p in reversed(entries):
        if p not in sys.path:
            sys.path.insert(0, p)


_extend_sys_path()

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from extproc.embeddings.encoder import get_encoder  # noqa: E402


_BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _blas_threads(args) -> str:
    """Apply the ``blas_threads`` parameter (unless the environment chose); returns what was done."""
    params = json.loads(args.get("model_config", "{}")).get("parameters", {})
    wanted = str(params.get("blas_threads", {}).get("string_value", "1")).strip().lower()
    if any(os.environ.get(k) for k in _BLAS_ENV):
        return "as the environment says"
    if wanted in ("auto", "0", ""):
        return "the library's choice"
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=int(wanted), user_api="blas")
    return wanted


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args.get("model_config", "{}")).get("parameters", {})
        runtime = str(params.get("runtime", {}).get("string_value", "auto")).strip() or "auto"
        self.encoder = get_encoder(runtime)
        threads = _blas_threads(args)
        pb_utils.Logger.log_info(
            f"embedder: all-MiniLM-L6-v2 from {self.encoder.model_dir} "
            f"(runtime {type(self.encoder).__name__}, dim={self.encoder.dim}, "
            f"max_seq_length={self.encoder.max_seq_length}, blas_threads={threads})"
        )

    def execute(self, requests):
        texts = []
        spans = []
        errors = {}
        for i, request in enumerate(requests):
            try:
                arr = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
                items = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr]
            except Exception as exc:  # e.g. invalid UTF-8: fail this request only
                errors[i] = f"embedder: bad input: {exc}"
                items = []
            spans.append((len(texts), len(items)))
            texts.extend(items)

        vectors = self.encoder.encode(texts) if texts else np.empty((0, self.encoder.dim), np.float32)

        responses = []
        for i, (start, n) in enumerate(spans):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(errors[i])))
                continue
            out = pb_utils.Tensor("embedding", np.ascontiguousarray(vectors[start : start + n], dtype=np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self):
        self.encoder = None
