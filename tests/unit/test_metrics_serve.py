"""`extproc serve --metrics-port`: two real worker processes, one /metrics served by the parent.

A gRPC client plays Envoy, opening a new connection per request (the kernel spreads connections
over the SO_REUSEPORT workers) until both workers have served; the parent's /metrics must show the
sum of both. On SIGTERM the per-run metrics directory is removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from extproc.framework.config import default_config_text
from extproc.commands.stack import grpc_serving, http_ok
from extproc.framework.testing import triton_answer

from ..conftest import free_port
from .test_wire import exchange, hmap, request_phases


def _samples(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            out[key] = out.get(key, 0) + s.value
    return out


def _sum(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def _one_request(port: int) -> None:
    """A whole non-streamed chat request on a fresh connection: 5 prompt + 3 completion tokens."""
    body = json.dumps({"model": "small", "messages": [{"role": "user", "content": "hi"}]}).encode()
    messages = request_phases(body) + [
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hmap(_status="200"))),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"".join(triton_answer("one two three")),
                                                       end_of_stream=True)),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        answers = await exchange(ch, messages)
    assert len(answers) == len(messages)


def test_two_workers_metrics_are_merged_by_the_parent(tmp_path: Path):
    config = yaml.safe_load(default_config_text())
    config["plugins"] = [{"name": "model_tiers"}, {"name": "metrics", "on_error": "fail_open"}]
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port, metrics_port = free_port(), free_port()
    parent_dir = tmp_path / "prom"
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(parent_dir))
    proc = subprocess.Popen([sys.executable, "-m", "extproc", "serve", "--config", str(cfg), "--port", str(port),
                             "--workers", "2", "--metrics-port", str(metrics_port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (grpc_serving(port) and http_ok(f"http://127.0.0.1:{metrics_port}/metrics")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        (run_dir,) = list(parent_dir.iterdir())  # the per-run directory under $PROMETHEUS_MULTIPROC_DIR
        sent = 0

        def worker_pids():
            return {f.stem.rsplit("_", 1)[1] for f in run_dir.glob("counter_*.db")}

        while len(worker_pids()) < 2 and sent < 40:
            asyncio.run(_one_request(port))
            sent += 1
        assert len(worker_pids()) == 2, f"all {sent} connections went to one worker"
        samples = _samples(metrics_port)
        assert _sum(samples, "extproc_requests_total", outcome="completed", tier="small") == sent
        assert _sum(samples, "extproc_tokens_total", kind="prompt") == 5 * sent
        assert _sum(samples, "extproc_tokens_total", kind="completion") == 3 * sent
        assert _sum(samples, "extproc_cost_usd_total") == pytest.approx(sent * (5 * 0.0001 + 3 * 0.0002) / 1000)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert list(parent_dir.iterdir()) == []  # the run's directory is gone


def test_metrics_port_in_use_fails_start_up_naming_it(tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "extproc", "serve", "--port", str(free_port()),
                                 "--workers", "1", "--metrics-port", str(busy)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{busy}" in result.stderr
