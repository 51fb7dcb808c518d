"""Starting the whole local stack: Triton with the CPU models, the ext_proc service, and Envoy.

Used by ``extproc up`` and by the end-to-end tests, so both start exactly the same processes.
Every process is a real binary on loopback ports; :class:`Stack` starts them in dependency order,
waits until each is ready, and stops them in reverse order.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.commands.redis_server import redis_answers, redis_server_command
from extproc.commands.tritonserver import TritonProcess, free_port
from extproc.serving.lifeline import dying_with_parent

DEFAULT_MODELS = ("llm-small", "llm-medium", "llm-large")
TRITON_CLUSTERS = ("tier_small", "tier_medium", "tier_large")
EMBEDDER_MODEL = "embedder"  #: triton_models/embedder (embeddings.backend: triton)


def clusters_of(models) -> tuple[str, ...]:
    """Envoy's tier clusters of these reference models (``llm-small`` is ``tier_small``...)."""
    return tuple(f"tier_{m.removeprefix('llm-')}" for m in models if f"tier_{m.removeprefix('llm-')}" in TRITON_CLUSTERS)


def project_root() -> Path:
    """The checkout holding ``envoy/`` and ``triton_models/`` (the working directory, or the package's parent)."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (candidate / "envoy" / "envoy.yaml").exists() and (candidate / "triton_models").is_dir():
            return candidate
    raise FileNotFoundError("cannot find envoy/envoy.yaml and triton_models/: run from the llm-extproc checkout")


class ManagedProcess:
    """A child process with its output in a log file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict | None = None):
        self.name, self.cmd, self.log_path, self.env = name, cmd, log_path, env
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self.started = 0.0  #: when it was last started (monotonic)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(dying_with_parent(self.cmd), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def wait_until(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before {what}:\n{self.log_tail()}")
            if check():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not {what} after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode


def grpc_serving(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether the ext_proc service on ``port`` answers its health check with SERVING."""
    try:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def service_command(config_path: Path | None, port: int, workers: int | None, redis_url: str | None,
                    host: str = "127.0.0.1", metrics_port: int | None = None,
                    triton_metrics_url: str | None = None, worker_sockets: Path | None = None,
                    embeddings_triton_url: str | None = None) -> list[str]:
    """The command line that starts the ext_proc service (``extproc serve``)."""
    cmd = [sys.executable, "-m", "extproc", "serve", "--host", host, "--port", str(port)]
    if embeddings_triton_url:
        cmd += ["--embeddings-triton-url", embeddings_triton_url]
    if worker_sockets is not None:
        cmd += ["--worker-sockets", str(worker_sockets)]
    if metrics_port is not None:
        cmd += ["--metrics-port", str(metrics_port)]
    if triton_metrics_url:
        cmd += ["--triton-metrics-url", triton_metrics_url]
    if config_path:
        cmd += ["--config", str(config_path)]
    if workers:
        cmd += ["--workers", str(workers)]
    if redis_url:
        cmd += ["--redis", redis_url]
    return cmd


class PortsInUse(RuntimeError):
    """Ports the stack would listen on are taken already (another ``extproc up``, say)."""


def ports_in_use(ports: dict[str, int], host: str = "127.0.0.1") -> list[str]:
    """``"<port> (<what>)"`` for each of ``ports`` that something already listens on.

    The probe sets SO_REUSEADDR as the servers do, so a port whose last connections linger in
    TIME_WAIT counts as free, and only a live listener counts as taken.
    """
    taken = []
    for what, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                taken.append(f"{port} ({what})")
    return taken


@dataclass
class StackPorts:
    """Loopback ports of the stack; 0 picks a free one."""

    listen: int = 10000
    admin: int = 9901
    extproc: int = 50051
    triton_http: int = 8000
    triton_grpc: int = 8001
    triton_metrics: int = 8002
    passthrough: int = 8100

    def resolved(self) -> "StackPorts":
        return StackPorts(**{k: v or free_port() for k, v in self.__dict__.items()})


@dataclass
class Stack:
    """Triton + ext_proc service + Envoy, started together and stopped together."""

    work_dir: Path
    ports: StackPorts = field(default_factory=StackPorts)
    config_path: Path | None = None
    models: tuple[str, ...] = DEFAULT_MODELS
    workers: int | None = None
    redis_url: str | None = None
    envoy_yaml: Path | None = None
    triton_models: Path | None = None
    with_triton: bool = True
    triton_env: dict | None = None  # extra environment for Triton (e.g. the reference tiers' knobs)
    metrics_port: int | None = None  # the service's Prometheus /metrics port; None: as its config says
    #: One Unix socket per service worker (``server.worker_sockets``, under work_dir/sockets), each an
    #: endpoint of Envoy's extproc cluster, instead of the one SO_REUSEPORT port. Needs ``workers``.
    worker_sockets: bool = False
    #: Start a Redis of the stack's own (work_dir/redis: Unix socket, AOF) and share state in it,
    #: unless ``redis_url`` names one already.
    local_redis: bool = False
    #: The configuration computes embeddings on Triton (``embeddings.backend: triton``): the stack's
    #: Triton loads the ``embedder`` model too, and the service is pointed at it.
    embedder: bool = False
    triton: TritonProcess | None = None
    redis: ManagedProcess | None = None
    service: ManagedProcess | None = None
    envoy: ManagedProcess | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL clients use (through Envoy)."""
        return f"http://127.0.0.1:{self.ports.listen}/v1"

    @property
    def socket_dir(self) -> Path | None:
        """Where the workers' sockets are (``worker_sockets``), else None."""
        return self.work_dir / "sockets" if self.worker_sockets else None

    def start(self) -> "Stack":
        if self.worker_sockets and not self.workers:
            raise ValueError("worker_sockets needs an explicit number of workers (Envoy lists each socket)")
        root = project_root() if (self.envoy_yaml is None or self.triton_models is None) else None
        self.envoy_yaml = self.envoy_yaml or root / "envoy" / "envoy.yaml"
        self.triton_models = self.triton_models or root / "triton_models"
        self.ports = self.ports.resolved()
        self._check_ports_free()
        logs = self.work_dir / "logs"
        try:
            if self.local_redis and not self.redis_url:
                self.start_redis()
            if self.with_triton:
                self.triton = TritonProcess(
                    self.triton_models, http_port=self.ports.triton_http, grpc_port=self.ports.triton_grpc,
                    metrics_port=self.ports.triton_metrics, work_dir=self.work_dir / "triton",
                    log_path=logs / "triton.log", models=self.triton_models_loaded(), env=self.triton_env,
                )
                self.triton.start()
            self.start_service()
            self.start_envoy()
            if self.triton is not None:
                self.triton.wait_ready(timeout=180)
            # Each tier is health-checked by a generation of its own model: those loaded must pass.
            self.envoy.wait_until(lambda: self.clusters_healthy(clusters_of(self.models)), 60,
                                  "seeing the Triton tiers healthy")
        except BaseException:
            self.stop()
            raise
        return self

    def triton_models_loaded(self) -> list[str]:
        """The models the stack's Triton loads: the tiers', and the embedder when asked for."""
        return [*self.models, *((EMBEDDER_MODEL,) if self.embedder and EMBEDDER_MODEL not in self.models else ())]

    def _check_ports_free(self) -> None:
        """Fail before starting anything if a port is taken: otherwise the readiness checks would
        find the *other* stack's servers ready and report this one up."""
        p = self.ports
        wanted = {"Envoy listener": p.listen, "Envoy admin": p.admin}
        if not self.worker_sockets:
            wanted["ext_proc service"] = p.extproc
        if self.metrics_port:
            wanted["service metrics"] = self.metrics_port
        if self.with_triton:
            wanted.update({"Triton HTTP": p.triton_http, "Triton gRPC": p.triton_grpc,
                           "Triton metrics": p.triton_metrics})
        taken = ports_in_use(wanted)
        if taken:
            raise PortsInUse(f"already in use on 127.0.0.1: {', '.join(taken)}")

    def start_redis(self) -> None:
        cmd, url = redis_server_command(self.work_dir / "redis")
        self.redis = ManagedProcess("redis", cmd, self.work_dir / "logs" / "redis.log")
        self.redis.start()
        self.redis.wait_until(lambda: redis_answers(url), 30, "answering")
        self.redis_url = url

    def start_service(self) -> None:
        self.service = ManagedProcess(
            "extproc service",
            service_command(self.config_path, self.ports.extproc, self.workers, self.redis_url,
                            metrics_port=self.metrics_port,
                            triton_metrics_url=f"http://127.0.0.1:{self.ports.triton_metrics}/metrics",
                            worker_sockets=self.socket_dir,
                            embeddings_triton_url=f"http://127.0.0.1:{self.ports.triton_http}"
                            if self.embedder else None),
            self.work_dir / "logs" / "extproc.log",
        )
        self.service.start()
        self.service.wait_until(lambda: grpc_serving(self.ports.extproc), 60, "serving")

    def stop_service(self) -> int | None:
        return self.service.stop() if self.service else None

    def start_envoy(self) -> None:
        from extproc.commands.envoy_config import envoy_binary, write_envoy_config
        from extproc.serving.server import worker_socket_paths

        config = write_envoy_config(
            self.envoy_yaml, self.work_dir / "envoy.yaml",
            listen_port=self.ports.listen, admin_port=self.ports.admin, extproc_port=self.ports.extproc,
            triton_port=self.ports.triton_http, passthrough_port=self.ports.passthrough,
            extproc_sockets=worker_socket_paths(self.socket_dir, self.workers) if self.worker_sockets else None,
        )
        self.envoy = ManagedProcess(
            "envoy",
            [envoy_binary(), "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn",
             "--concurrency", "2"],
            self.work_dir / "logs" / "envoy.log",
        )
        self.envoy.start()
        self.envoy.wait_until(lambda: http_ok(f"http://127.0.0.1:{self.ports.admin}/ready"), 30, "ready")

    def clusters_healthy(self, clusters: tuple[str, ...]) -> bool:
        """Whether Envoy's health checks see every host of these clusters as healthy."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.admin}/clusters", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return False
        flags = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[2] == "health_flags":
                flags[parts[0]] = parts[3]
        return all(flags.get(c) == "healthy" for c in clusters)

    def stop(self) -> None:
        """Stop Envoy, then the service (it sends its last settlements), then Triton, then Redis."""
        for proc in (self.envoy, self.service):
            if proc is not None:
                proc.stop()
        if self.triton is not None:
            self.triton.stop()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
