"""TritonMetricsClient against a canned /metrics page (captured from the tritonserver of
nvidia-pytriton serving the embedder model, 20 requests) served by a tiny local HTTP server."""

from __future__ import annotations

import asyncio
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from extproc.observability.triton_metrics import ModelLoad, TritonMetricsClient, TritonMetricsError, parse_metrics  # noqa: E402

# Captured from a real tritonserver (2.51, CPU): 20 single-item requests to "embedder".
CAPTURED = """# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="embedder",version="1"} 20
# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="embedder",reason="OTHER",version="1"} 0
nv_inference_request_failure{model="embedder",reason="BACKEND",version="1"} 0
nv_inference_request_failure{model="embedder",reason="CANCELED",version="1"} 0
nv_inference_request_failure{model="embedder",reason="REJECTED",version="1"} 0
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="embedder",version="1"} 20
# HELP nv_inference_exec_count Number of model executions performed (does not include cached requests)
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="embedder",version="1"} 5
# HELP nv_inference_request_duration_us Cumulative inference request duration in microseconds (includes cached requests)
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{model="embedder",version="1"} 441714
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds (includes cached requests)
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="embedder",version="1"} 137218
# HELP nv_inference_compute_input_duration_us Cumulative compute input duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_input_duration_us counter
nv_inference_compute_input_duration_us{model="embedder",version="1"} 2712
# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{model="embedder",version="1"} 291410
# HELP nv_inference_compute_output_duration_us Cumulative inference compute output duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_output_duration_us counter
nv_inference_compute_output_duration_us{model="embedder",version="1"} 10188
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="embedder",version="1"} 0
# HELP nv_pinned_memory_pool_total_bytes Pinned memory pool total memory size, in bytes
# TYPE nv_pinned_memory_pool_total_bytes gauge
nv_pinned_memory_pool_total_bytes 268435456
# HELP nv_pinned_memory_pool_used_bytes Pinned memory pool used memory size, in bytes
# TYPE nv_pinned_memory_pool_used_bytes gauge
nv_pinned_memory_pool_used_bytes 0
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.3819095477386935
# HELP nv_cpu_memory_total_bytes CPU total memory (RAM), in bytes
# TYPE nv_cpu_memory_total_bytes gauge
nv_cpu_memory_total_bytes 25276510208
# HELP nv_cpu_memory_used_bytes CPU used memory (RAM), in bytes
# TYPE nv_cpu_memory_used_bytes gauge
nv_cpu_memory_used_bytes 1276030976
"""

# What a GPU server adds (names and labels as Triton documents them), and a second model with
# two versions, to check per-model sums.
GPU_AND_MORE = """# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{gpu_uuid="GPU-0d4e1c8a"} 85899345920
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-0d4e1c8a"} 72477573120
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="ensemble",version="1"} 7
nv_inference_pending_request_count{model="ensemble",version="2"} 2
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="ensemble",version="1"} 300
nv_inference_count{model="ensemble",version="2"} 100
# HELP nv_inference_exec_count Number of model executions performed (does not include cached requests)
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="ensemble",version="1"} 40
nv_inference_exec_count{model="ensemble",version="2"} 10
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ensemble",version="1"} 290
nv_inference_request_success{model="ensemble",version="2"} 100
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds (includes cached requests)
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="ensemble",version="1"} 1500000
nv_inference_queue_duration_us{model="ensemble",version="2"} 450000
"""


class _Server:
    """HTTP server on a free loopback port answering /metrics with ``self.body``."""

    def __init__(self, body: str, *, status: int = 200, chunked: bool = False, delay: float = 0.0):
        self.body, self.status, self.chunked, self.delay = body, status, chunked, delay
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                outer.hits += 1
                if outer.delay:
                    threading.Event().wait(outer.delay)
                data = outer.body.encode()
                self.send_response(outer.status if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                if outer.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(data), 500):
                        part = data[i : i + 500]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def make(body: str = CAPTURED, **kw) -> _Server:
        s = _Server(body, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def test_parse_captured_page():
    loads, gpu = parse_metrics(CAPTURED)
    assert set(loads) == {"embedder"}
    e = loads["embedder"]
    assert e == ModelLoad(
        pending=0,
        queue_us_total=137218.0,
        inference_count=20,
        exec_count=5,
        success=20,
        failure=0,
        request_us_total=441714.0,
        compute_infer_us_total=291410.0,
    )
    assert e.avg_batch == pytest.approx(4.0)
    assert e.avg_queue_us == pytest.approx(137218 / 20)
    assert gpu == {"used": {}, "total": {}}


def test_parse_gpu_and_versions():
    loads, gpu = parse_metrics(CAPTURED + GPU_AND_MORE)
    ens = loads["ensemble"]
    assert ens.pending == 9 and ens.inference_count == 400 and ens.exec_count == 50 and ens.success == 390
    assert ens.avg_batch == pytest.approx(8.0)
    assert ens.queue_us_total == pytest.approx(1_950_000)
    assert gpu["used"] == {"GPU-0d4e1c8a": 72477573120.0}
    assert gpu["total"] == {"GPU-0d4e1c8a": 85899345920.0}
    assert loads["embedder"].success == 20


def test_model_load_helpers():
    empty = ModelLoad(pending=0, queue_us_total=0, inference_count=0, exec_count=0, success=0)
    assert empty.avg_batch == 0.0 and empty.avg_queue_us == 0.0
    a = ModelLoad(pending=3, queue_us_total=100, inference_count=10, exec_count=4, success=10)
    b = ModelLoad(pending=1, queue_us_total=400, inference_count=40, exec_count=10, success=38)
    d = b.since(a)
    assert (d.pending, d.queue_us_total, d.inference_count, d.exec_count, d.success) == (1, 300, 30, 6, 28)
    assert d.avg_batch == pytest.approx(5.0)
    restarted = ModelLoad(pending=0, queue_us_total=5, inference_count=2, exec_count=1, success=2)
    assert restarted.since(b).inference_count == 2  # counter reset: count from zero


def test_malformed_text_raises():
    with pytest.raises(TritonMetricsError):
        parse_metrics('nv_inference_count{model="x" 12\n')


async def test_snapshot_over_http(server):
    s = server()
    client = TritonMetricsClient(s.url, timeout=2.0, max_age=60.0)
    loads = await client.snapshot()
    assert loads["embedder"].inference_count == 20 and loads["embedder"].avg_batch == 4.0
    assert client.gpu_memory_used == {}


async def test_snapshot_chunked_and_gpu(server):
    s = server(CAPTURED + GPU_AND_MORE, chunked=True)
    client = TritonMetricsClient(s.url, timeout=2.0)
    loads = await client.snapshot()
    assert loads["ensemble"].pending == 9
    assert client.gpu_memory_used == {"GPU-0d4e1c8a": 72477573120.0}
    assert client.gpu_memory_total["GPU-0d4e1c8a"] == 85899345920.0


async def test_cache_and_shared_scrape(server):
    s = server(delay=0.05)
    client = TritonMetricsClient(s.url, timeout=2.0, max_age=30.0)
    results = await asyncio.gather(*(client.snapshot() for _ in range(20)))
    assert s.hits == 1 and client.scrapes == 1
    assert all(r is results[0] for r in results)
    await client.snapshot()
    assert s.hits == 1  # still cached
    client.invalidate()
    await client.snapshot()
    assert s.hits == 2


async def test_max_age_zero_refetches(server):
    s = server()
    client = TritonMetricsClient(s.url, max_age=0.0)
    await client.snapshot()
    await client.snapshot()
    assert s.hits == 2


async def test_expiry(server):
    s = server()
    client = TritonMetricsClient(s.url, max_age=0.1)
    await client.snapshot()
    await asyncio.sleep(0.15)
    await client.snapshot()
    assert s.hits == 2


async def test_http_error_status(server):
    s = server(status=503)
    client = TritonMetricsClient(s.url)
    with pytest.raises(TritonMetricsError, match="503"):
        await client.snapshot()


async def test_timeout(server):
    s = server(delay=1.0)
    client = TritonMetricsClient(s.url, timeout=0.2, max_age=5.0)
    with pytest.raises(TritonMetricsError, match="no answer"):
        await client.snapshot()
    # the failure is cached for max_age: no second connection while it is fresh
    with pytest.raises(TritonMetricsError):
        await client.snapshot()
    assert client.scrapes == 1


async def test_connection_refused():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = TritonMetricsClient(f"http://127.0.0.1:{port}/metrics", timeout=1.0)
    with pytest.raises(TritonMetricsError):
        await client.snapshot()


async def test_bad_url():
    with pytest.raises(TritonMetricsError, match="unsupported"):
        await TritonMetricsClient("https://example.invalid/metrics").snapshot()


def test_client_usable_from_several_event_loops(server):
    s = server()
    client = TritonMetricsClient(s.url, max_age=0.0)
    for _ in range(2):
        assert asyncio.run(client.snapshot())["embedder"].success == 20
