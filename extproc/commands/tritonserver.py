"""Launch the real NVIDIA Triton Inference Server shipped inside the ``nvidia-pytriton`` wheel.

``nvidia-pytriton`` bundles a complete ``tritonserver`` binary (2.51 for pytriton 0.7), its shared
libraries and the Python backend.  This module turns that into something the tests, the
benchmarks and ``extproc up`` can start with one call::

    from extproc.commands.tritonserver import TritonProcess

    with TritonProcess(Path("triton_models"), http_port=8000, grpc_port=8001, metrics_port=8002,
                       work_dir=Path("/tmp/triton"), models=["llm-small"]) as triton:
        triton.wait_ready()
        ... POST f"{triton.http_url}/v2/models/llm-small/generate" ...

What it takes care of (all found out the hard way on a CPU-only machine):

* ``LD_LIBRARY_PATH`` gets ``<site-packages>/nvidia_pytriton.libs`` (the binary's own libraries)
  and, *first*, the running interpreter's ``LIBDIR`` so the Python backend stub loads the same
  ``libpython3.X`` as the venv (otherwise a system libpython of the same minor version may win).
* ``--backend-directory`` must hold ``python/`` with ``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and the ``triton_python_backend_stub`` built for the
  running Python's ``major.minor``; :func:`prepare_backend_dir` assembles it under ``work_dir``.
* The stub does **not** honour ``PYTHONPATH`` for ``sys.path``.  So :func:`triton_env` exports
  ``EXTPROC_TRITON_SYS_PATH`` (``os.pathsep``-separated: the venv's site-packages, then the model
  repository, then any extra entries) and every ``model.py`` in this repo starts by prepending
  those entries to ``sys.path``.

Selecting models: the repository at ``triton_models/`` also holds folders that are not models
for this server (the shared ``reference_llm`` package, a README, the GPU ``trtllm/`` repository).
``TritonProcess(models=[...])`` therefore starts Triton with ``--model-control-mode=explicit`` and
one ``--load-model`` per name, so only those models are looked at.  ``models=None`` starts Triton
in its default mode, which loads every folder of the repository (only sensible for a repository
that contains nothing but models).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

from extproc.commands.blas import prefer_fast_kernels
from extproc.serving.lifeline import group_leader

__all__ = [
    "TritonInstall",
    "TritonProcess",
    "find_tritonserver",
    "free_port",
    "prepare_backend_dir",
    "triton_env",
    "SYS_PATH_ENV",
]

#: Environment variable read by every ``model.py``: entries to prepend to ``sys.path``.
SYS_PATH_ENV = "EXTPROC_TRITON_SYS_PATH"


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the pytriton-bundled Triton live."""

    binary: Path        #: the ``tritonserver`` executable
    libs_dir: Path      #: ``<site-packages>/nvidia_pytriton.libs`` (goes on LD_LIBRARY_PATH)
    backend_src: Path   #: directory with ``libtriton_python.so`` + ``triton_python_backend_utils.py``
    stub: Path          #: ``triton_python_backend_stub`` for the running Python's major.minor
    python_libdir: Path | None  #: the running interpreter's LIBDIR (holds libpython3.X.so)


def find_tritonserver() -> TritonInstall:
    """Locate the Triton binary, its libraries and the Python backend inside ``nvidia-pytriton``.

    Raises ``RuntimeError`` with an install hint when the wheel (or a piece of it) is missing.
    """
    # Found, not imported: importing pytriton loads gevent, zmq, aiohttp and more (seconds, and
    # C extensions) into `extproc up`, which only needs the folder.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - environment
        raise RuntimeError(
            "nvidia-pytriton is not installed: it provides the tritonserver binary. "
            "Install it with `pip install 'nvidia-pytriton==0.7.0'` (or `pip install -e .[stack]`)."
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations))).resolve()
    server_dir = pkg_dir / "tritonserver"
    binary = server_dir / "bin" / "tritonserver"
    libs_dir = pkg_dir.parent / "nvidia_pytriton.libs"
    backend_src = server_dir / "backends" / "python"
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    missing = [
        str(p)
        for p in (binary, libs_dir, backend_src / "libtriton_python.so",
                  backend_src / "triton_python_backend_utils.py", stub)
        if not p.exists()
    ]
    if missing:
        raise RuntimeError(
            "nvidia-pytriton is installed but incomplete for this platform/Python "
            f"({pyver}); missing: {', '.join(missing)}"
        )
    libdir = sysconfig.get_config_var("LIBDIR")
    return TritonInstall(
        binary=binary,
        libs_dir=libs_dir,
        backend_src=backend_src,
        stub=stub,
        python_libdir=Path(libdir) if libdir else None,
    )


def prepare_backend_dir(dest: Path) -> Path:
    """Build ``<dest>/python/`` (backend library, utils module, stub) for ``--backend-directory``.

    Idempotent: files already present with the same size are left alone.  Returns ``dest``.
    """
    install = find_tritonserver()
    dest = Path(dest)
    py_dir = dest / "python"
    py_dir.mkdir(parents=True, exist_ok=True)
    for src in (
        install.backend_src / "libtriton_python.so",
        install.backend_src / "triton_python_backend_utils.py",
        install.stub,
    ):
        target = py_dir / src.name
        if target.exists() and target.stat().st_size == src.stat().st_size:
            continue
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.copy2(src, tmp)
        os.replace(tmp, target)
    stub = py_dir / "triton_python_backend_stub"
    stub.chmod(stub.stat().st_mode | 0o111)
    return dest


def _site_packages() -> list[str]:
    paths: list[str] = []
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p and p not in paths:
            paths.append(p)
    try:
        for p in site.getsitepackages():
            if p not in paths:
                paths.append(p)
    except AttributeError:  # pragma: no cover - virtualenv's old site.py
        pass
    # Entries of the current sys.path that are site/dist-packages (e.g. editable installs' parents).
    for p in sys.path:
        if p and ("site-packages" in p or "dist-packages" in p) and p not in paths:
            paths.append(p)
    return paths


def triton_env(extra_sys_path: list[str]) -> dict[str, str]:
    """Environment for ``tritonserver``: a copy of this process's environment plus

    * ``LD_LIBRARY_PATH`` = interpreter LIBDIR : nvidia_pytriton.libs : previous value;
    * ``EXTPROC_TRITON_SYS_PATH`` = ``extra_sys_path`` entries, then this venv's site-packages
      (``os.pathsep``-separated), for the models' ``sys.path``.
    """
    install = find_tritonserver()
    env = dict(os.environ)
    ld = [str(install.python_libdir)] if install.python_libdir else []
    ld.append(str(install.libs_dir))
    if env.get("LD_LIBRARY_PATH"):
        ld.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
    entries: list[str] = []
    for p in [*map(str, extra_sys_path), *_site_packages()]:
        if p not in entries:
            entries.append(p)
    env[SYS_PATH_ENV] = os.pathsep.join(entries)
    env.setdefault("PYTHONUNBUFFERED", "1")
    prefer_fast_kernels(env)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (bind to port 0 and release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonProcess:
    """A ``tritonserver`` child process bound to loopback ports.

    ``models=None`` loads the whole ``model_repository``; otherwise Triton runs with
    ``--model-control-mode=explicit`` and loads exactly the listed models (other folders of the
    repository are ignored).  ``work_dir`` receives the assembled backend directory and, unless
    ``log_path`` is given, the server log ``tritonserver.log``.  Extra ``tritonserver`` flags go in
    ``extra_args``.  Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        http_port: int,
        grpc_port: int,
        metrics_port: int,
        work_dir: Path,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
        models: list[str] | None = None,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.http_port = int(http_port)
        self.grpc_port = int(grpc_port)
        self.metrics_port = int(metrics_port)
        self.work_dir = Path(work_dir)
        self.log_path = Path(log_path) if log_path else self.work_dir / "tritonserver.log"
        self.extra_args = list(extra_args)
        self.models = list(models) if models is not None else None
        self.extra_env = dict(env or {})
        self.host = host
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- urls -------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- lifecycle --------------------------------------------------------------------------
    def command(self) -> list[str]:
        install = find_tritonserver()
        backend_dir = self.work_dir / "backends"
        cmd = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--log-verbose=0",
        ]
        if self.models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd.extend(f"--load-model={m}" for m in self.models)
        cmd.extend(self.extra_args)
        return cmd

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("tritonserver already running")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        prepare_backend_dir(self.work_dir / "backends")
        env = triton_env([str(self.model_repository)])
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            # Its model processes go with it, and it with whoever started it (SIGKILL included).
            group_leader(self.command()),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(self.work_dir),
            start_new_session=True,  # our own process group: stop() can reach the stubs too
        )

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout: float = 120) -> None:
        """Block until ``/v2/health/ready`` answers 200.

        Raises ``RuntimeError`` (with the end of the server log) if the process exits first or
        the timeout passes.
        """
        if self._proc is None:
            raise RuntimeError("tritonserver was not started")
        deadline = time.monotonic() + timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {rc} before becoming ready; log tail "
                    f"({self.log_path}):\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tritonserver not ready after {timeout:.0f}s; log tail "
                    f"({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def alive(self) -> bool:
        """Whether the server process is running."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The server's exit status once it has exited (None while it runs or before a start)."""
        return None if self._proc is None else self._proc.poll()

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the server (it then shuts its Python stubs down), SIGKILL its whole process
        group after ``timeout`` seconds or if stubs outlive it."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(timeout=10)
            if proc is not None:
                # Stubs are in the same process group; make sure none is left behind.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "TritonProcess":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if self._proc is not None and self._proc.poll() is None:
                self.stop(timeout=5)
        except Exception:
            pass
