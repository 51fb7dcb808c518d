#!/usr/bin/env python3
"""The floor of the ext_proc hop in Python: a no-op grpc.aio ext_proc server behind the real Envoy.

The server answers every message with an empty reply of the right kind (and sets the tier header
in the request-body answer so the route is re-picked), so whatever latency remains is Envoy's
ext_proc filter plus Python grpc.aio, not the gateway. The rows of MODES are compared, each on its
own Envoy in front of the same stub upstream:

  4 messages   envoy/envoy.yaml as shipped (request headers, request body, response headers and body)
  3 messages   response headers skipped
  2 messages   both response phases skipped
  full duplex  request body FULL_DUPLEX_STREAMED (pipelined: the headers are answered after the
               body is read), optionally the response body too
  UDS          the same over a Unix socket (an Envoy `pipe` endpoint) instead of loopback TCP

    python benchmarks/bench_extproc_floor.py [--requests 1500] [--rounds 2] [--modes 1,4,6]
        [--wrk-connections 16 --wrk-duration 5] [--no-go]

Two no-op servers are measured the same way: the Python one (grpc.aio, this file) and, as the
reference for what Envoy's ext_proc filter costs by itself, one in Go (grpc-go,
benchmarks/noop_extproc_go/main.go, built here with Debian's golang-go and golang-google-grpc-dev,
installed by scripts/ensure-debs.sh when missing; --no-go skips it). Besides the p50 the table
shows the CPU time each request costs the ext_proc server and Envoy (from /proc, whole run); with
--wrk-connections also req/s and CPU per request at that many connections (wrk).

One client (and wrk if asked), HTTP/1.1 keep-alive, loopback only, bounded by --requests and
--wrk-duration. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: name -> (processing_mode changes, transport); "tcp": 127.0.0.1 port, "uds": a Unix socket (Envoy
#: `pipe` endpoint). The Go server runs only the TCP rows without full duplex (it does not pipeline).
REQ_FD = {"request_body_mode": "FULL_DUPLEX_STREAMED", "request_trailer_mode": "SEND"}
RESP_FD = {"response_body_mode": "FULL_DUPLEX_STREAMED", "response_trailer_mode": "SEND"}
MODES = {
    "4 messages (shipped)": ({}, "tcp"),
    "3 messages (no response headers)": ({"response_header_mode": "SKIP"}, "tcp"),
    "2 messages (no response phases)": ({"response_header_mode": "SKIP", "response_body_mode": "NONE"}, "tcp"),
    "4 msgs, request full duplex": (REQ_FD, "tcp"),
    "4 msgs, req+resp full duplex": ({**REQ_FD, **RESP_FD}, "tcp"),
    "4 messages (shipped), UDS": ({}, "uds"),
    "4 msgs, req+resp full duplex, UDS": ({**REQ_FD, **RESP_FD}, "uds"),
}


async def noop_server(addresses: list[str]) -> None:
    """Answer every ext_proc message with an empty reply; route every request to `passthrough`.

    With a FULL_DUPLEX_STREAMED request body (told by the first message's ``protocol_config``) the
    request headers are not answered at once: the body is read to its end first, then the headers
    answer (tier header, clear_route_cache) and the body answer (a StreamedBodyResponse with the
    body) go out back to back, so Envoy waits for the service once in the request phase, not
    twice. A FULL_DUPLEX_STREAMED response body is echoed chunk by chunk (Envoy forwards only what
    the server sends back in that mode).
    """
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

    full_duplex = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED

    def tier_common() -> "pb.CommonResponse":
        common = pb.CommonResponse(clear_route_cache=True)
        common.header_mutation.set_headers.add(
            header=base_pb2.HeaderValue(key="x-extproc-tier", raw_value=b"passthrough"))
        return common

    def streamed(phase: str, body: bytes, end: bool) -> "pb.ProcessingResponse":
        common = pb.CommonResponse()
        common.body_mutation.streamed_response.body = body
        common.body_mutation.streamed_response.end_of_stream = end
        return pb.ProcessingResponse(**{phase: pb.BodyResponse(response=common)})

    class NoOp(pb_grpc.ExternalProcessorServicer):
        async def Process(self, request_iterator, context):
            req_fd = resp_fd = False
            held = False  # request headers read, not answered yet (full duplex)
            body = bytearray()
            while (request := await context.read()) is not grpc.aio.EOF:
                phase = request.WhichOneof("request")
                if request.HasField("protocol_config"):
                    req_fd = request.protocol_config.request_body_mode == full_duplex
                    resp_fd = request.protocol_config.response_body_mode == full_duplex
                if req_fd and phase == "request_headers" and not request.request_headers.end_of_stream:
                    held = True
                    continue
                if req_fd and phase in ("request_body", "request_trailers"):
                    if phase == "request_body":
                        body += request.request_body.body
                        if not request.request_body.end_of_stream:
                            continue
                    if held:
                        await context.write(pb.ProcessingResponse(
                            request_headers=pb.HeadersResponse(response=tier_common())))
                        held = False
                    await context.write(streamed("request_body", bytes(body), True))
                    if phase == "request_trailers":
                        await context.write(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
                    continue
                if resp_fd and phase == "response_body":
                    m = request.response_body
                    await context.write(streamed("response_body", m.body, m.end_of_stream))
                    continue
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
    for address in addresses:
        server.add_insecure_port(address)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


GO_SOURCE = ROOT / "benchmarks" / "noop_extproc_go" / "main.go"


def go_replies_match() -> None:
    """The Go server's hand-serialised replies must equal what the protobuf types produce."""
    import re

    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    common = pb.CommonResponse(clear_route_cache=True)
    common.header_mutation.set_headers.add(header=base_pb2.HeaderValue(key="x-extproc-tier", raw_value=b"passthrough"))
    want = {
        0x12: pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
        0x1A: pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
        0x22: pb.ProcessingResponse(request_body=pb.BodyResponse(response=common)),
        0x2A: pb.ProcessingResponse(response_body=pb.BodyResponse()),
        0x32: pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
        0x3A: pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
    }
    table = GO_SOURCE.read_text().split("var replies")[1].split("\n}")[0]
    got = {int(k, 16): bytes(int(b, 16) for b in re.findall(r"0x[0-9a-f]{2}", v))
           for k, v in re.findall(r"(0x[0-9a-f]{2}): \{([^}]*)\}", table)}
    for tag, msg in want.items():
        if got.get(tag) != msg.SerializeToString():
            raise SystemExit(f"noop_extproc_go/main.go: reply for tag {tag:#x} does not match the protobuf types")


def build_go_server(work: Path) -> Path | None:
    """Build the Go no-op server (Debian's Go and grpc-go, GOPATH mode, no network); None if it can't."""
    ensure = ROOT / "scripts" / "ensure-debs.sh"
    if subprocess.run([str(ensure), "golang-go", "golang-google-grpc-dev"]).returncode != 0:
        print("skipping the Go reference: golang-go / golang-google-grpc-dev could not be installed")
        return None
    go_replies_match()
    out = work / "noop-go"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "GOCACHE": str(work / "gocache")}
    go = shutil.which("go") or "/usr/lib/go/bin/go"
    built = subprocess.run([go, "build", "-o", str(out), str(GO_SOURCE)], env=env, capture_output=True, text=True)
    if built.returncode != 0:
        print(f"skipping the Go reference: go build failed:\n{built.stderr}")
        return None
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        if i == 0 and reply.getheader("x-stub-body-bytes") != str(len(body)):  # the body got through whole
            raise RuntimeError(f"the upstream got {reply.getheader('x-stub-body-bytes')} body bytes, not {len(body)}")
        if i >= 200:  # warm-up done
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--no-go", action="store_true", help="skip the Go reference server")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every row this many times, rows interleaved (round 2 in reverse order)")
    ap.add_argument("--wrk-connections", type=int, default=0,
                    help="also measure req/s with wrk at this many connections (and CPU per request there)")
    ap.add_argument("--wrk-duration", type=float, default=5.0)
    ap.add_argument("--modes", default="", help="comma-separated row numbers (1-based, as in MODES) to run; default all")
    args = ap.parse_args(argv)
    import yaml

    from extproc.commands.envoy_config import envoy_binary, write_envoy_config
    from extproc.commands.stack import ManagedProcess, grpc_serving, http_ok
    from extproc.commands.tritonserver import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    uds = work / "noop.sock"
    servers: dict[str, list[str]] = {"Python grpc.aio": [sys.executable, __file__, "--noop-server"]}
    if not args.no_go and (go := build_go_server(work)) is not None:
        servers["Go grpc-go"] = [str(go)]
    stub_port = free_port()
    stub = ManagedProcess("stub", [sys.executable, str(ROOT / "benchmarks" / "stub_upstream.py"), "--port", str(stub_port), "--echo"],
                          work / "stub.log")
    stub.start()
    procs = [stub]
    wanted = {int(x) for x in args.modes.split(",") if x.strip()} or set(range(1, len(MODES) + 1))
    modes = {name: spec for i, (name, spec) in enumerate(MODES.items(), 1) if i in wanted}
    sources = {}
    for i, (name, (changes, _transport)) in enumerate(modes.items()):
        cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        for f in hcm["http_filters"]:
            if f["name"] == "envoy.filters.http.ext_proc":
                f["typed_config"]["processing_mode"].update(changes)
        sources[name] = work / f"src{i}.yaml"
        sources[name].write_text(yaml.safe_dump(cfg))

    def start_envoy(src: Path, ext_port: int, tag: str, transport: str = "tcp") -> tuple[int, ManagedProcess]:
        listen, admin = free_port(), free_port()
        config = write_envoy_config(src, work / f"envoy-{tag}.yaml", listen_port=listen, admin_port=admin,
                                    extproc_port=ext_port, triton_port=stub_port, passthrough_port=stub_port)
        if transport == "uds":  # the extproc cluster's endpoint becomes the server's Unix socket
            cfg = yaml.safe_load(config.read_text())
            for cluster in cfg["static_resources"]["clusters"]:
                if cluster["name"] == "extproc":
                    cluster["type"] = "STATIC"
                    cluster.pop("dns_lookup_family", None)
                    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = {
                        "pipe": {"path": str(uds)}}
            config.write_text(yaml.safe_dump(cfg))
        envoy = ManagedProcess("envoy", [envoy_binary(), "-c", str(config), "--use-dynamic-base-id",
                                         "--log-level", "error", "--concurrency", "1"], work / f"envoy-{tag}.log")
        envoy.start()
        procs.append(envoy)
        envoy.wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "ready")
        return listen, envoy

    if args.wrk_connections:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_extproc_hop import ensure_wrk, run_wrk

        wrk = ensure_wrk()

    def measure(port: int, server: ManagedProcess | None, envoy: ManagedProcess) -> str:
        n = args.requests + 200  # p50() sends 200 warm-up requests first
        s0 = cpu_seconds(server.proc.pid) if server else 0.0
        e0 = cpu_seconds(envoy.proc.pid)
        value = p50(port, args.requests)
        s1 = cpu_seconds(server.proc.pid) if server else 0.0
        e1 = cpu_seconds(envoy.proc.pid)
        out = f"{value:7.3f}   {(s1 - s0) / n * 1000:8.3f}   {(e1 - e0) / n * 1000:8.3f}"
        if args.wrk_connections:
            res = run_wrk(wrk, f"http://127.0.0.1:{port}", args.wrk_connections, args.wrk_duration, 1)
            s2 = cpu_seconds(server.proc.pid) if server else 0.0
            e2 = cpu_seconds(envoy.proc.pid)
            k = max(1, res["requests"])
            out += f"   {res['rps']:8.0f}   {(s2 - s1) / k * 1000:8.3f}   {(e2 - e1) / k * 1000:8.3f}"
            if res["errors"]:
                out += f"  ({res['errors']} errors)"
        return out

    try:
        rows = []
        port, envoy = start_envoy(ROOT / "envoy" / "envoy-nofilter.yaml", 0, "nofilter")
        time.sleep(1)
        rows.append(("Envoy without ext_proc", "", measure(port, None, envoy)))
        envoy.stop()
        for server_name, cmd in servers.items():
            go_server = not server_name.startswith("Python")
            ext_port = free_port()
            addresses = [str(ext_port)] if go_server else [f"127.0.0.1:{ext_port}", f"unix:{uds}"]
            server = ManagedProcess(server_name, [*cmd, *addresses], work / f"{server_name.split()[0]}.log")
            server.start()
            procs.append(server)
            server.wait_until(lambda: grpc_serving(ext_port), 30, "serving")
            names = [m for m in sources if not (go_server and (modes[m][1] != "tcp" or "full duplex" in m))]
            for r in range(args.rounds):
                for i, mode in enumerate(names if r % 2 == 0 else names[::-1]):
                    port, envoy = start_envoy(sources[mode], ext_port, f"{server_name.split()[0]}{r}-{i}", modes[mode][1])
                    time.sleep(3)  # health checks
                    rows.append((server_name, mode, measure(port, server, envoy)))
                    envoy.stop()
        print(f"1 client, {args.requests} requests per row (after 200 warm-up); no-op ext_proc servers")
        head = f"{'server':18s} {'mode':34s} {'p50 ms':>7s}  {'server CPU':>9s}  {'Envoy CPU':>9s}"
        if args.wrk_connections:
            head += f"  {'req/s @' + str(args.wrk_connections):>9s}  {'server CPU':>9s}  {'Envoy CPU':>9s}"
        print(head + "  (CPU: ms per request)")
        for server_name, mode, figures in rows:
            print(f"{server_name:18s} {mode:34s} {figures}")
    finally:
        for p in reversed(procs):
            p.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--noop-server":
        # Python: any number of grpc addresses ("127.0.0.1:PORT", "unix:/path"); a bare port = loopback.
        addrs = [a if not a.isdigit() else f"127.0.0.1:{a}" for a in sys.argv[2:]]
        asyncio.run(noop_server(addrs))
    else:
        raise SystemExit(main())
