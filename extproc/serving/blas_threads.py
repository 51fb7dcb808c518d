"""How many BLAS threads a worker process computes with (``server.blas_threads``).

NumPy's OpenBLAS starts one thread per core in every process. A worker owns about one core (the
service runs one worker per core, beside Envoy), and its matrix products are small (MiniLM on a
short prompt, a vector search over a few thousand rows): two workers with two BLAS threads each
on two cores oversubscribe them, every product waits for its slowest thread, and the spinning
threads burn CPU. Measured through Envoy on a 2-vCPU VM (benchmarks/bench_auto_routing.py, new
``auto`` prompts): gateway CPU per request 41 -> 20 ms at one connection, 24.6 -> 15.7 ms at 16,
throughput 77 -> 117 req/s. The Triton model processes pin theirs the same way
(``triton_models/reference_llm/blas_threads.py``).

An explicit ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in the environment
wins (the operator chose); ``0`` leaves the library's own choice.
"""

from __future__ import annotations

from typing import Mapping

BLAS_LIBRARY_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def wanted_blas_threads(configured: int, env: Mapping[str, str]) -> int | None:
    """The thread count to impose, or None to leave the library's (``0``, or set in ``env``)."""
    if configured <= 0 or any(env.get(k) for k in BLAS_LIBRARY_ENV):
        return None
    return configured


def limit_blas_threads(threads: int | None) -> int | None:
    """Apply ``threads`` (None: change nothing) to the BLAS libraries loaded in this process
    (NumPy's is loaded here if it was not yet); returns the smallest thread count they report
    afterwards, None when no BLAS library is found."""
    import numpy  # noqa: F401 - loads the BLAS library threadpoolctl is to find
    from threadpoolctl import threadpool_info, threadpool_limits

    if threads is not None:
        threadpool_limits(limits=threads, user_api="blas")
    counts = [info["num_threads"] for info in threadpool_info() if info.get("user_api") == "blas"]
    return min(counts) if counts else None
