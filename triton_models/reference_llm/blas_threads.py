"""How many BLAS threads a reference-model process computes with.

A tier's forward pass is a chain of matrix products, and NumPy's OpenBLAS starts one thread per
core by default.  On a CPU the model shares with Triton's HTTP/gRPC front end, the response
sender, the gateway and Envoy, a pool per model process oversubscribes the cores: every product
waits for its slowest thread.  Measured on a 2-vCPU VM (README, "Measured cost and batching
gain"): the 16-row product of the large tier's MLP took 257 to 1,418 µs with 2 threads depending
on the machine's state, 418-424 µs with one, steadily.  So each tier's ``config.pbtxt`` asks for one
thread (parameter ``blas_threads``); give it more on a machine with cores to spare.

Precedence, highest first: ``EXTPROC_LLM_BLAS_THREADS_<TIER>``, ``EXTPROC_LLM_BLAS_THREADS``,
then an explicit ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in the
environment (left alone: the operator chose), then the config parameter.  ``auto`` (or ``0``)
leaves the BLAS library's own choice.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from .launch_env import tier_override

ENV = "EXTPROC_LLM_BLAS_THREADS"
BLAS_LIBRARY_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _parse(value: str, name: str) -> Optional[int]:
    text = str(value).strip().lower()
    if text in ("auto", "0"):
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        raise ValueError(f"{name} must be a positive number of threads or 'auto', got {value!r}")
    return n


def blas_thread_limit(configured: Optional[str], tier: str,
                      env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The number of BLAS threads to impose on this process, or None to leave the library's.

    :param configured: the model's ``blas_threads`` config parameter (None if absent).
    :param tier: the tier name (``small``/``llm-small``...), for the per-tier variable.
    :param env: the environment (default: this process's).
    :raises ValueError: a value that is neither a positive integer nor ``auto``.
    """
    env = os.environ if env is None else env
    override = tier_override(ENV, tier, env)
    if override is not None:
        name, value = override
        return _parse(value, name)
    if any(env.get(k) for k in BLAS_LIBRARY_ENV):
        return None
    return _parse(configured, "blas_threads") if configured else None


def limit_blas_threads(threads: Optional[int]) -> Optional[int]:
    """Apply ``threads`` (None: change nothing) to the BLAS libraries loaded in this process.

    Returns the thread count the BLAS reports afterwards (the smallest, if several are loaded),
    or None when no BLAS library is found.
    """
    from threadpoolctl import threadpool_info, threadpool_limits

    if threads is not None:
        threadpool_limits(limits=threads, user_api="blas")
    counts = [info["num_threads"] for info in threadpool_info() if info.get("user_api") == "blas"]
    return min(counts) if counts else None
