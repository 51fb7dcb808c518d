"""`extproc serve`: several worker processes on one port; SIGTERM drains and exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from extproc.commands.stack import grpc_serving

from ..conftest import free_port


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_workers_share_one_port_and_sigterm_exits_cleanly(tmp_path: Path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "extproc", "serve", "--port", str(port), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # the parent says so once every worker serves
            if "ext_proc service ready" in line:
                break
        assert grpc_serving(port)
        workers = [p for p in children(proc.pid)
                   if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
        assert len(workers) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert out.count("draining") == 2, out
    assert not grpc_serving(port)


def test_sigterm_during_start_up_still_exits_cleanly():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "extproc", "serve", "--port", str(port), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the parent has its handlers; the workers are still importing
        if "starting 2 worker(s)" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_bad_config_fails_start_up_naming_the_key(tmp_path: Path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("tiers: {small: {model: m, knd: triton}}\ndefault_tier: small\n")
    result = subprocess.run([sys.executable, "-m", "extproc", "serve", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "tiers.small.knd: unknown key" in result.stderr


def _serving_on_socket(path: Path) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_worker_sockets_one_per_worker_beside_the_port_and_removed_on_exit(tmp_path: Path):
    from extproc.serving.server import worker_socket_paths

    port = free_port()
    sockets = tmp_path / "socks"
    sockets.mkdir()
    # A socket file left by a worker that was killed must not stop the new one from binding.
    import socket as _socket

    stale = _socket.socket(_socket.AF_UNIX)
    stale.bind(str(sockets / "extproc-1.sock"))
    stale.close()
    proc = subprocess.Popen([sys.executable, "-m", "extproc", "serve", "--port", str(port), "--workers", "2",
                             "--worker-sockets", str(sockets)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "ext_proc service ready" in line:
                break
        paths = [Path(p) for p in worker_socket_paths(sockets, 2)]
        assert [p.name for p in paths] == ["extproc-0.sock", "extproc-1.sock"]
        assert all(_serving_on_socket(p) for p in paths)
        assert grpc_serving(port)  # the shared port is still there (health probes, one-endpoint configs)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert not any(p.exists() for p in paths), out


def test_worker_socket_path_too_long_fails_start_up(tmp_path: Path):
    import asyncio

    import pytest

    from extproc.framework.config import load_config
    from extproc.serving.server import start_worker

    config = load_config(None, overrides={"server": {"port": 0, "worker_sockets": str(tmp_path / ("d" * 120))}})
    with pytest.raises(OSError, match="too long"):
        asyncio.run(start_worker(config))


_REPORT_EXITS = """
import os, signal, sys
from extproc.framework.config import load_config
from extproc.serving.server import serve_workers
config = load_config(None, overrides={"server": {"port": int(sys.argv[1]), "workers": 2},
                                      "plugins": [{"name": "model_tiers"}]})
status = serve_workers(config, on_ready=lambda port: os.kill(os.getpid(), signal.SIGTERM),
                       on_worker_exit=lambda pid: print("exited", pid, flush=True))
sys.exit(status)
"""


def test_every_exited_worker_is_reported_once():
    """serve_workers tells on_worker_exit (the metrics' worker_exited in `serve`) of each worker's pid."""
    proc = subprocess.run([sys.executable, "-c", _REPORT_EXITS, str(free_port())],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pids = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("exited ")]
    assert len(pids) == 2 and len(set(pids)) == 2, proc.stdout


def test_serve_marks_exited_workers_dead_in_the_metrics(monkeypatch, tmp_path):
    from extproc.framework.config import load_config
    from extproc.observability import metrics
    from extproc.serving import server

    marked = []
    monkeypatch.setattr(metrics, "worker_exited", lambda pid, path: marked.append((pid, path)))
    monkeypatch.setattr(metrics, "prepare_multiprocess_dir", lambda: str(tmp_path))
    monkeypatch.setattr(metrics, "remove_multiprocess_dir", lambda path: None)

    class Server:
        server_port = 1

        def shutdown(self): ...

        def server_close(self): ...

    monkeypatch.setattr(metrics, "start_metrics_server", lambda *a, **k: (Server(), None))

    def fake_serve_workers(config, *, on_ready=None, on_worker_exit=None, stats=None):
        on_worker_exit(4242)
        return 0

    monkeypatch.setattr(server, "serve_workers", fake_serve_workers)
    config = load_config(None, overrides={"server": {"metrics_port": 9}})
    assert server.serve(config) == 0
    assert marked == [(4242, str(tmp_path))]


_SUPERVISED = """
import sys
from extproc.framework.config import load_config
from extproc.serving.server import serve_workers
config = load_config(None, overrides={"server": {"port": int(sys.argv[1]), "workers": 2},
                                      "plugins": [{"name": "model_tiers"}]})
sys.exit(serve_workers(config, on_ready=lambda port: print("ready", flush=True)))
"""


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _workers(pid: int) -> set[int]:
    """The worker processes of a `serve_workers` parent (not multiprocessing's resource tracker)."""
    return {c for c in _children(pid)
            if b"multiprocessing.spawn" in Path(f"/proc/{c}/cmdline").read_bytes()
            and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()}


def _wait(predicate, timeout: float = 30.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_dead_worker_is_replaced_while_the_other_serves():
    import os

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SUPERVISED, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        first = _wait(lambda: _workers(proc.pid) if len(_workers(proc.pid)) == 2 else None)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        assert _wait(lambda: grpc_serving(port), 5)  # the other one answers meanwhile
        now = _wait(lambda: _workers(proc.pid) if len(_workers(proc.pid)) == 2 and victim not in
                    _workers(proc.pid) else None)
        assert now and victim not in now and (first - {victim}) <= now
        assert _wait(lambda: grpc_serving(port), 30)
        assert proc.poll() is None  # the service did not stop
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "exited with code -9" in err and "replacing it" in err, err


def test_workers_die_with_a_killed_parent():
    import os

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SUPERVISED, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "ready"
    workers = _wait(lambda: _workers(proc.pid) if len(_workers(proc.pid)) == 2 else None)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert _wait(lambda: not any(_alive(w) for w in workers), 10), "workers outlived their parent"


_RECYCLING = """
import sys
from extproc.framework.config import load_config
from extproc.serving.server import serve_workers
config = load_config(None, overrides={"server": {"port": int(sys.argv[1]), "workers": 2, "max_streams_per_worker": 20},
                                      "plugins": [{"name": "model_tiers"}]})
sys.exit(serve_workers(config, on_ready=lambda port: print("ready", flush=True)))
"""


def _models_stream(stub, pb, base_pb2):
    """One ext_proc stream as Envoy sends it for GET /v1/models: answered from the request headers."""
    headers = base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode())
        for k, v in ((":method", "GET"), (":path", "/v1/models"), (":authority", "gw"), (":scheme", "http"))])
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=headers, end_of_stream=True))
    return list(stub.Process(iter([msg]), timeout=10))


def test_a_worker_is_recycled_after_max_streams_per_worker_and_nothing_is_lost():
    """server.max_streams_per_worker: a worker drains and exits once it has handled about that many
    streams (+-10 %), the parent replaces it at once; every stream is answered (a client retries
    opening a stream that finds no listener, as Envoy's retry_policy does)."""
    import time

    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _RECYCLING, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    answered = retried = 0
    try:
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(90):
            seen |= _workers(proc.pid)
            for attempt in range(50):
                try:
                    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                        replies = _models_stream(pb_grpc.ExternalProcessorStub(channel), pb, base_pb2)
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                    retried += 1
                    time.sleep(0.1)
            assert replies and replies[0].HasField("immediate_response")
            answered += 1
            time.sleep(0.05)  # the worker looks at its count every 0.5 s
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert answered == 90
    assert proc.returncode == 0, err
    recycled = err.count("draining to be replaced")
    assert recycled >= 2, err  # 90 streams over two workers of 18..22 each
    assert len(seen) >= 3 and "exited with code" not in err, err
    # One at a time: a worker never starts draining while another recycled one is not replaced yet.
    events = [line for line in err.splitlines() if "draining to be replaced" in line or "serving ext_proc" in line]
    pending = 0
    for line in events[2:]:  # after the first two workers started
        pending += 1 if "draining" in line else -1
        assert pending <= 1, events
    print(f"{answered} streams answered, {recycled} workers recycled, {retried} stream opens retried")
