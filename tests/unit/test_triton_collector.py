"""The parent's Triton collector: per-tier queue depth, compute time and GPU memory, read at scrape time."""

from __future__ import annotations

import http.server
import threading

from prometheus_client import CollectorRegistry, generate_latest

from extproc.observability.metrics import TritonCollector

from ..conftest import free_port

TRITON_TEXT = """\
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="llm-small",version="1"} 3
nv_inference_pending_request_count{model="other-model",version="1"} 9
# TYPE nv_inference_count counter
nv_inference_count{model="llm-small",version="1"} 40
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="llm-small",version="1"} 10
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="llm-small",version="1"} 40
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{model="llm-small",version="1"} 2500000
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="llm-small",version="1"} 500000
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-abc"} 1.5e+09
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{gpu_uuid="GPU-abc"} 8e+10
"""


def serve_text(text: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = text.encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def scrape(collector) -> dict:
    registry = CollectorRegistry()
    registry.register(collector)
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in generate_latest(registry).decode().splitlines() if line and not line.startswith("#")}


def test_queue_depth_compute_time_and_gpu_memory_per_tier():
    server = serve_text(TRITON_TEXT)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        got = scrape(TritonCollector(url, {"llm-small": "small", "llm-large": "large"}))
    finally:
        server.shutdown()
    assert got["extproc_triton_up"] == 1
    assert got['extproc_triton_queue_depth{model="llm-small",tier="small"}'] == 3
    assert got['extproc_triton_compute_seconds_total{model="llm-small",tier="small"}'] == 2.5
    assert got['extproc_triton_queue_seconds_total{model="llm-small",tier="small"}'] == 0.5
    assert got['extproc_triton_inferences_total{model="llm-small",tier="small"}'] == 40
    assert got['extproc_triton_gpu_memory_used_bytes{gpu="GPU-abc"}'] == 1.5e9
    assert got['extproc_triton_gpu_memory_total_bytes{gpu="GPU-abc"}'] == 8e10
    assert not any("other-model" in k or "large" in k for k in got)  # only configured tiers' models


def test_triton_down_is_reported_not_raised():
    got = scrape(TritonCollector(f"http://127.0.0.1:{free_port()}/metrics", {"llm-small": "small"}, timeout=0.5))
    assert got == {"extproc_triton_up": 0}
