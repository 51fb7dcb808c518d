"""Running the ext_proc service: one grpc.aio server per worker process, several workers on one port.

Each worker binds the same address with ``SO_REUSEPORT``, so the kernel spreads Envoy's
connections across them. The kernel picks a worker per *connection*, and Envoy opens only one per
worker thread, so two connections often land on the same worker and the other one idles; with
``server.worker_sockets`` each worker also listens on a Unix socket of its own
(:func:`worker_socket_path`), Envoy lists every socket as an endpoint and spreads the streams
itself (round robin), so every worker gets its share. Each serves ``grpc.health.v1`` (overall and for
``envoy.service.ext_proc.v3.ExternalProcessor``). On SIGTERM or SIGINT a worker reports
NOT_SERVING, stops taking new streams, lets in-flight ones finish for ``grace_seconds``, runs the
plugins' shutdown hooks and exits; the parent forwards the signal to every worker and waits.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from .config import GatewayConfig
from .gateway import Gateway
from .wire import ExternalProcessor, add_to_server

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def grpc_options(max_request_bytes: int) -> list[tuple[str, int]]:
    """Server options: SO_REUSEPORT, and message limits above the largest body we accept."""
    limit = max(MAX_MESSAGE_BYTES, 2 * max_request_bytes)
    return [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]


def worker_socket_path(directory: str | os.PathLike, index: int) -> str:
    """The Unix socket worker ``index`` listens on when ``server.worker_sockets`` is set."""
    return os.path.join(os.fspath(directory), f"extproc-{index}.sock")


def worker_socket_paths(directory: str | os.PathLike, workers: int) -> list[str]:
    """Every worker's socket, in worker order: the Envoy endpoints of the ``extproc`` cluster."""
    return [worker_socket_path(directory, i) for i in range(workers)]


def _check_socket_path(path: str) -> None:
    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes with the final NUL
        raise OSError(f"Unix socket path too long ({len(os.fsencode(path))} bytes, at most 107): {path}")


def _bind_worker_socket(server: grpc.aio.Server, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # left by a worker that did not stop cleanly
    except FileNotFoundError:
        pass
    if server.add_insecure_port(f"unix:{path}") == 0:
        raise OSError(f"cannot listen on the Unix socket {path}")


@dataclass
class RunningWorker:
    """A started worker: the server and what it needs to stop cleanly."""

    server: grpc.aio.Server
    health: HealthServicer
    processor: ExternalProcessor
    gateway: Gateway
    port: int
    socket_path: str | None = None

    async def drain_and_stop(self, grace: float) -> None:
        """NOT_SERVING first, so health checks see it; then stop with a grace period."""
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        if self.socket_path is not None:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        await self.gateway.stop()


async def start_worker(config: GatewayConfig, *, gateway: Gateway | None = None, index: int = 0) -> RunningWorker:
    """Build the gateway, run plugin start-up, and start serving on the configured address (and,
    with ``server.worker_sockets``, on worker ``index``'s Unix socket)."""
    socket_path = None
    if config.server.worker_sockets:
        socket_path = worker_socket_path(config.server.worker_sockets, index)
        _check_socket_path(socket_path)
    gateway = gateway or Gateway(config)
    await gateway.start()
    server = grpc.aio.server(options=grpc_options(config.server.max_request_bytes))
    processor = ExternalProcessor(gateway.new_stream)
    add_to_server(processor, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(f"{config.server.host}:{config.server.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.server.host}:{config.server.port}")
    if socket_path is not None:
        _bind_worker_socket(server, socket_path)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return RunningWorker(server, health, processor, gateway, port, socket_path)


async def serve_worker(config: GatewayConfig, ready=None, index: int = 0) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return (a signal during start-up counts too)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = await start_worker(config, index=index)
    from . import memdiag

    diag = memdiag.start_from_env(worker)  # only with $EXTPROC_MEMDIAG_DIR (soak runs)
    log.info("worker %d serving ext_proc on %s:%d%s with plugins %s",
             os.getpid(), config.server.host, worker.port,
             f" and unix:{worker.socket_path}" if worker.socket_path else "", ", ".join(worker.gateway.plugin_names))
    if ready is not None:
        ready.set()
    await stop.wait()
    if diag is not None:
        await diag.stop()
    log.info("worker %d draining (%d stream(s) in flight, grace %.1fs)",
             os.getpid(), worker.processor.active_streams, config.server.grace_seconds)
    await worker.drain_and_stop(config.server.grace_seconds)


def configure_logging(level: str) -> None:
    """Plain one-line logs on stderr, with the process id (several workers share the terminal)."""
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )


def _worker_main(config: GatewayConfig, ready, index: int = 0) -> None:
    os.environ["EXTPROC_WORKER_INDEX"] = str(index)  # lets a plugin run one thing once (the admin API)
    configure_logging(config.server.log_level)
    try:
        asyncio.run(serve_worker(config, ready, index))
    except Exception:
        log.exception("worker failed")
        sys.exit(1)


def reserve_port(host: str, port: int) -> tuple[int, socket.socket | None]:
    """For port 0, pick a free port and hold it (bound, not listening, SO_REUSEPORT) for the workers."""
    if port != 0:
        return port, None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock.getsockname()[1], sock


def serve(config: GatewayConfig, *, on_ready=None) -> int:
    """Run the workers (:func:`serve_workers`) and, with ``server.metrics_port``, serve every worker's
    Prometheus metrics from this parent process (see :mod:`extproc.metrics`)."""
    if not config.server.metrics_port:
        return serve_workers(config, on_ready=on_ready)
    from . import metrics

    path = metrics.prepare_multiprocess_dir()  # before the workers start: they inherit it
    try:
        httpd, _thread = metrics.start_metrics_server(
            config.server.metrics_port, config.server.host, path, triton_url=config.server.triton_metrics_url,
            model_tiers={t.model: name for name, t in config.tiers.items() if t.kind == "triton"})
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d: %s", config.server.host, config.server.metrics_port, exc)
        metrics.remove_multiprocess_dir(path)
        return 1
    log.info("Prometheus metrics on http://%s:%d/metrics", config.server.host, httpd.server_port)
    try:
        return serve_workers(config, on_ready=on_ready)
    finally:
        httpd.shutdown()
        httpd.server_close()
        metrics.remove_multiprocess_dir(path)


def serve_workers(config: GatewayConfig, *, on_ready=None) -> int:
    """Run ``config.server.workers`` worker processes on one port until SIGTERM/SIGINT.

    :param on_ready: called with the port once every worker is serving.
    :return: the exit status (0 when every worker drained cleanly).
    """
    workers = config.server.workers or os.cpu_count() or 1
    port, holder = reserve_port(config.server.host, config.server.port)
    config = config.model_copy(update={"server": config.server.model_copy(update={"port": port})})
    ctx = multiprocessing.get_context("spawn")
    procs, events = [], []
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("starting %d worker(s) on %s:%d", workers, config.server.host, port)
    for index in range(workers):
        ready = ctx.Event()
        proc = ctx.Process(target=_worker_main, args=(config, ready, index), daemon=False)
        proc.start()
        procs.append(proc)
        events.append(ready)
    if stopping:  # a signal came while the workers were being started: make sure all of them hear it
        forward(signal.SIGTERM, None)

    deadline = time.monotonic() + 60
    while not all(e.is_set() for e in events) and not stopping:
        if any(not p.is_alive() for p in procs) or time.monotonic() > deadline:
            forward(signal.SIGTERM, None)
            for p in procs:
                p.join(config.server.grace_seconds + 5)
            log.error("a worker failed to start")
            return 1
        time.sleep(0.02)
    if holder is not None:
        holder.close()
    if not stopping:
        log.info("ext_proc service ready on %s:%d with %d worker(s)", config.server.host, port, workers)
        if on_ready is not None:
            on_ready(port)
    status = 0
    for p in procs:
        while p.is_alive():
            p.join(0.5)
            if not stopping and any(not q.is_alive() for q in procs):
                log.error("a worker exited unexpectedly; stopping the others")
                forward(signal.SIGTERM, None)
        code = p.exitcode or 0
        if stopping and code == -signal.SIGTERM:
            code = 0  # stopped by our SIGTERM before it had installed its handler: nothing in flight
        status = status or code
    return status
