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
import multiprocessing.connection
import os
import random
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from extproc import environment
from extproc.framework.config import GatewayConfig
from extproc.framework.gateway import Gateway
from extproc.serving import blas_threads
from extproc.serving.lifeline import die_with_parent
from extproc.upstreams.registry import exports_triton_metrics
from extproc.wire.processor import ExternalProcessor, add_to_server

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


async def serve_worker(config: GatewayConfig, ready=None, index: int = 0, recycle_lock=None) -> bool:
    """Serve until SIGTERM/SIGINT, then drain and return (a signal during start-up counts too).

    :param recycle_lock: held while a worker of the same service recycles (one at a time).
    :return: True when it stopped to be recycled (``server.max_streams_per_worker``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = await start_worker(config, index=index)
    from extproc.observability import memdiag

    diag = memdiag.start_from_env(worker)  # only with $EXTPROC_MEMDIAG_DIR (soak runs)
    log.info("worker %d serving ext_proc on %s:%d%s with plugins %s",
             os.getpid(), config.server.host, worker.port,
             f" and unix:{worker.socket_path}" if worker.socket_path else "", ", ".join(worker.gateway.plugin_names))
    if ready is not None:
        ready.set()
    recycle = _recycle_when_done(worker, config.server.max_streams_per_worker, stop, recycle_lock)
    await stop.wait()
    recycle.cancel()
    if diag is not None:
        await diag.stop()
    log.info("worker %d draining (%d stream(s) in flight, grace %.1fs)",
             os.getpid(), worker.processor.active_streams, config.server.grace_seconds)
    await worker.drain_and_stop(config.server.grace_seconds)
    return recycle.done() and not recycle.cancelled()


#: The exit status of a worker that stopped because it reached ``server.max_streams_per_worker``:
#: the parent replaces it at once (no back-off, not counted as a failure).
RECYCLE_EXIT = 75


def _recycle_when_done(worker: RunningWorker, limit: int, stop: asyncio.Event, lock=None) -> asyncio.Task:
    """A task that sets ``stop`` once the worker has handled about ``limit`` streams (never for 0)
    and holds ``lock`` (a multiprocessing lock the parent releases once the replacement serves, so
    that workers recycle one at a time and never all at once); it ends (not cancelled) only then."""

    async def watch() -> None:
        if not limit:
            await asyncio.Event().wait()  # never
        target = int(limit * random.Random(os.getpid()).uniform(0.9, 1.1))
        while worker.processor.streams < target:
            await asyncio.sleep(0.5)
        while lock is not None and not lock.acquire(block=False):
            await asyncio.sleep(0.5)  # another worker is being recycled
        log.info("worker %d handled %d streams (max_streams_per_worker %d): draining to be replaced",
                 os.getpid(), worker.processor.streams, limit)
        stop.set()

    return asyncio.ensure_future(watch())


def configure_logging(level: str) -> None:
    """Plain one-line logs on stderr, with the process id (several workers share the terminal)."""
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )


def _worker_main(config: GatewayConfig, ready, index: int = 0, parent_pid: int | None = None,
                 recycle_lock=None) -> None:
    die_with_parent(parent_pid)  # a parent killed outright (SIGKILL) takes its workers with it
    environment.set_worker_index(index)  # lets a plugin run one thing once (the admin API)
    configure_logging(config.server.log_level)
    threads = blas_threads.limit_blas_threads(
        blas_threads.wanted_blas_threads(config.server.blas_threads, environment.process_environ()))
    log.debug("worker %d: %s BLAS thread(s)", os.getpid(), threads if threads is not None else "no")
    try:
        recycled = asyncio.run(serve_worker(config, ready, index, recycle_lock))
    except Exception:
        log.exception("worker failed")
        sys.exit(1)
    if recycled:
        sys.exit(RECYCLE_EXIT)


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
    Prometheus metrics from this parent process (see :mod:`extproc.observability.metrics`)."""
    if not config.server.metrics_port:
        return serve_workers(config, on_ready=on_ready)
    from extproc.observability import metrics

    path = metrics.prepare_multiprocess_dir()  # before the workers start: they inherit it
    stats = WorkerStats()
    try:
        httpd, _thread = metrics.start_metrics_server(
            config.server.metrics_port, config.server.host, path, triton_url=config.server.triton_metrics_url,
            model_tiers={t.model: name for name, t in config.tiers.items() if exports_triton_metrics(t)},
            worker_stats=stats)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d: %s", config.server.host, config.server.metrics_port, exc)
        metrics.remove_multiprocess_dir(path)
        return 1
    log.info("Prometheus metrics on http://%s:%d/metrics", config.server.host, httpd.server_port)
    try:
        return serve_workers(config, on_ready=on_ready, stats=stats,
                             on_worker_exit=lambda pid: metrics.worker_exited(pid, path))
    finally:
        httpd.shutdown()
        httpd.server_close()
        metrics.remove_multiprocess_dir(path)


@dataclass
class WorkerStats:
    """What the parent knows of its workers, for its own metrics (``extproc_workers_*``)."""

    alive: int = 0
    restarts: int = 0  #: replacements of workers that died
    recycled: int = 0  #: workers that stopped at max_streams_per_worker


@dataclass
class _Slot:
    """One worker position: its current process, and how quickly the last ones died."""

    index: int
    proc: multiprocessing.process.BaseProcess | None = None
    ready: object = None
    started: float = 0.0
    quick_failures: int = 0
    due: float = 0.0  # when to start the replacement (monotonic)
    recycling: bool = False  # the last one stopped at max_streams_per_worker (not a failure)
    release_when_ready: bool = False  # this one replaces a recycled one: release the recycle lock when it serves


#: A worker that dies within this many seconds of its start counts as a quick failure: the next
#: replacement waits twice as long (from RESTART_DELAY up to RESTART_DELAY_MAX).
QUICK_FAILURE_SECONDS = 10.0
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0


def serve_workers(config: GatewayConfig, *, on_ready=None, on_worker_exit=None,
                  stats: WorkerStats | None = None) -> int:
    """Run ``config.server.workers`` worker processes on one port until SIGTERM/SIGINT.

    A worker that dies once all are serving is replaced (after a back-off that grows while
    replacements keep dying quickly) while the others go on serving; a worker that fails to start
    fails the whole start-up. Workers die with this process, whatever kills it.

    :param on_ready: called with the port once every worker is serving.
    :param on_worker_exit: called with a worker's pid once it has exited (the metrics mark it dead).
    :param stats: updated with the workers alive and the replacements made.
    :return: the exit status (0 when every worker drained cleanly).
    """
    workers = config.server.workers or os.cpu_count() or 1
    port, holder = reserve_port(config.server.host, config.server.port)
    config = config.model_copy(update={"server": config.server.model_copy(update={"port": port})})
    ctx = multiprocessing.get_context("spawn")
    recycle_lock = ctx.Lock()  # one worker recycles at a time (max_streams_per_worker)
    slots = [_Slot(index) for index in range(workers)]
    stats = stats if stats is not None else WorkerStats()
    stopping = False
    me = os.getpid()

    def running():
        return [slot.proc for slot in slots if slot.proc is not None]

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for p in running():
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    reported: set[int] = set()
    ended: list = []  # every process that has exited, replaced ones included

    def report(p) -> None:  # each exited worker once, as soon as the parent sees it (the metrics mark it dead)
        if p.pid not in reported:
            reported.add(p.pid)
            ended.append(p)
            if on_worker_exit is not None:
                on_worker_exit(p.pid)

    def start(slot: _Slot) -> None:
        slot.ready = ctx.Event()
        slot.proc = ctx.Process(target=_worker_main, args=(config, slot.ready, slot.index, me, recycle_lock),
                                daemon=False)
        slot.proc.start()
        slot.started = time.monotonic()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("starting %d worker(s) on %s:%d", workers, config.server.host, port)
    for slot in slots:
        start(slot)
    if stopping:  # a signal came while the workers were being started: make sure all of them hear it
        forward(signal.SIGTERM, None)

    deadline = time.monotonic() + 60
    while not all(slot.ready.is_set() for slot in slots) and not stopping:
        if any(not p.is_alive() for p in running()) or time.monotonic() > deadline:
            forward(signal.SIGTERM, None)
            for p in running():
                p.join(config.server.grace_seconds + 5)
                report(p)
            log.error("a worker failed to start")
            return 1
        time.sleep(0.02)
    if holder is not None:
        holder.close()
    stats.alive = len(slots)
    if not stopping:
        log.info("ext_proc service ready on %s:%d with %d worker(s)", config.server.host, port, workers)
        if on_ready is not None:
            on_ready(port)
    while not stopping:
        waiting = [slot.due for slot in slots if slot.proc is None]
        timeout = max(0.0, min(waiting) - time.monotonic()) if waiting else 1.0
        multiprocessing.connection.wait([p.sentinel for p in running()], timeout=min(timeout, 1.0))
        now = time.monotonic()
        for slot in slots:
            if slot.release_when_ready and (slot.proc is None or slot.ready.is_set() or slot.proc.exitcode is not None):
                slot.release_when_ready = False
                recycle_lock.release()  # the replacement serves (or died): the next one may recycle
        for slot in slots:
            if stopping:
                break
            p = slot.proc
            if p is not None and p.exitcode is not None:
                report(p)
                slot.proc = None
                stats.alive -= 1
                lived = now - slot.started
                if p.exitcode == RECYCLE_EXIT:  # planned: it reached max_streams_per_worker and drained
                    slot.quick_failures, slot.due, slot.recycling = 0, now, True
                    stats.recycled += 1
                    log.info("worker %d (pid %d) recycled after %.1fs; replacing it now", slot.index, p.pid, lived)
                else:
                    slot.quick_failures = slot.quick_failures + 1 if lived < QUICK_FAILURE_SECONDS else 0
                    delay = min(RESTART_DELAY * 2 ** max(0, slot.quick_failures - 1), RESTART_DELAY_MAX)
                    slot.due = now + delay
                    log.error("worker %d (pid %d) exited with code %s after %.1fs; replacing it in %.1fs "
                              "(the others keep serving)", slot.index, p.pid, p.exitcode, lived, delay)
            if slot.proc is None and now >= slot.due:
                start(slot)
                stats.alive += 1
                stats.restarts += not slot.recycling
                slot.release_when_ready, slot.recycling = slot.recycling, False
                log.info("worker %d replaced (pid %d)", slot.index, slot.proc.pid)
    forward(signal.SIGTERM, None)  # also a replacement started while the signal came
    status = 0
    for p in running():
        while p.is_alive():
            p.join(0.5)
        report(p)
        code = p.exitcode or 0
        if code == RECYCLE_EXIT:
            code = 0  # it was draining for a recycle when the stop came
        if code == -signal.SIGTERM:
            code = 0  # stopped by our SIGTERM before it had installed its handler: nothing in flight
        status = status or code
    stats.alive = 0
    return status
