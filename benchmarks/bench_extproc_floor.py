#!/usr/bin/env python3
"""The floor of the ext_proc hop in Python: a no-op grpc.aio ext_proc server behind the real Envoy.

The server answers every message with an empty reply of the right kind (and sets the tier header
in the request-body answer so the route is re-picked), so whatever latency remains is Envoy's
ext_proc filter plus Python grpc.aio, not the gateway. Three processing modes are compared, each
on its own Envoy in front of the same stub upstream:

  4 messages  envoy/envoy.yaml as shipped (request headers, request body, response headers and body)
  3 messages  response headers skipped
  2 messages  both response phases skipped

    python benchmarks/bench_extproc_floor.py [--requests 1500]

One client, HTTP/1.1 keep-alive, loopback only, bounded by --requests. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import http.client
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = {
    "4 messages (shipped)": {},
    "3 messages (no response headers)": {"response_header_mode": "SKIP"},
    "2 messages (no response phases)": {"response_header_mode": "SKIP", "response_body_mode": "NONE"},
}


async def noop_server(port: int) -> None:
    """Answer every ext_proc message with an empty reply; route every request to `passthrough`."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    class NoOp(pb_grpc.ExternalProcessorServicer):
        async def Process(self, request_iterator, context):
            while (request := await context.read()) is not grpc.aio.EOF:
                phase = request.WhichOneof("request")
                if phase == "request_body":
                    common = pb.CommonResponse(clear_route_cache=True)
                    common.header_mutation.set_headers.add(
                        header=base_pb2.HeaderValue(key="x-extproc-tier", raw_value=b"passthrough"))
                    answer = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
                elif phase.endswith("headers"):
                    answer = pb.ProcessingResponse(**{phase: pb.HeadersResponse()})
                elif phase.endswith("body"):
                    answer = pb.ProcessingResponse(**{phase: pb.BodyResponse()})
                else:
                    answer = pb.ProcessingResponse(**{phase: pb.TrailersResponse()})
                await context.write(answer)

    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(NoOp(), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


def p50(port: int, n: int) -> float:
    body = json.dumps({"model": "stub", "messages": [{"role": "user", "content": "hi"}]})
    conn = http.client.HTTPConnection("127.0.0.1", port)
    times = []
    for i in range(n + 200):
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        reply = conn.getresponse()
        reply.read()
        if reply.status != 200:
            raise RuntimeError(f"status {reply.status}")
        if i >= 200:  # warm-up done
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1500)
    args = ap.parse_args(argv)
    import yaml

    from extproc.envoy_config import envoy_binary, write_envoy_config
    from extproc.stack import ManagedProcess, grpc_serving, http_ok
    from extproc.tritonserver import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    stub_port, ext_port = free_port(), free_port()
    procs = [
        ManagedProcess("stub", [sys.executable, str(ROOT / "benchmarks" / "stub_upstream.py"), "--port", str(stub_port)],
                       work / "stub.log"),
        ManagedProcess("no-op ext_proc", [sys.executable, __file__, "--noop-server", str(ext_port)], work / "noop.log"),
    ]
    for p in procs:
        p.start()
    ports: dict[str, int] = {}
    try:
        procs[1].wait_until(lambda: grpc_serving(ext_port), 30, "serving")
        for i, mode in enumerate(MODES.values()):
            cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
            hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            for f in hcm["http_filters"]:
                if f["name"] == "envoy.filters.http.ext_proc":
                    f["typed_config"]["processing_mode"].update(mode)
            src = work / f"src{i}.yaml"
            src.write_text(yaml.safe_dump(cfg))
        sources = {"Envoy without ext_proc": ROOT / "envoy" / "envoy-nofilter.yaml",
                   **{name: work / f"src{i}.yaml" for i, name in enumerate(MODES)}}
        for i, (name, src) in enumerate(sources.items()):
            listen, admin = free_port(), free_port()
            ports[name] = listen
            config = write_envoy_config(src, work / f"envoy{i}.yaml", listen_port=listen, admin_port=admin,
                                        extproc_port=ext_port, triton_port=stub_port, passthrough_port=stub_port)
            envoy = ManagedProcess("envoy", [envoy_binary(), "-c", str(config), "--use-dynamic-base-id",
                                             "--log-level", "error", "--concurrency", "1"], work / f"envoy{i}.log")
            envoy.start()
            procs.append(envoy)
            envoy.wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "ready")
        time.sleep(3)  # health checks
        print(f"p50 at 1 client over {args.requests} requests (ms); no-op Python grpc.aio ext_proc server")
        for name, port in ports.items():
            print(f"  {name:36s} {p50(port, args.requests):7.3f}")
    finally:
        for p in reversed(procs):
            p.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--noop-server":
        asyncio.run(noop_server(int(sys.argv[2])))
    else:
        raise SystemExit(main())
