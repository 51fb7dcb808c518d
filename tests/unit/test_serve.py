"""`extproc serve`: several worker processes on one port; SIGTERM drains and exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from extproc.stack import grpc_serving

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
    from extproc.server import worker_socket_paths

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

    from extproc.config import load_config
    from extproc.server import start_worker

    config = load_config(None, overrides={"server": {"port": 0, "worker_sockets": str(tmp_path / ("d" * 120))}})
    with pytest.raises(OSError, match="too long"):
        asyncio.run(start_worker(config))
