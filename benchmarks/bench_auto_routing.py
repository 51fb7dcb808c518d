#!/usr/bin/env python3
"""New ``model: auto`` prompts through Envoy: what routing them costs (latency, CPU per request).

    python benchmarks/bench_auto_routing.py [--embeddings local,triton] [--connections 1,16]
                                            [--duration 10] [--workers 2] [--runtime auto] [--out auto.json]

Every request is ``model: auto`` with a prompt never sent before (a held-out-style question with a
counter), so neither the route memo nor the embedding cache answers: the routing chain
(``route_rules``, ``semantic_routes``, ``learned_router``, ``model_tiers``) embeds each prompt.
The three tiers are served by the stub upstream (``benchmarks/stub_upstream.py``, kind
``openai``; Envoy's tier clusters point at it, their Triton health checks removed), so the figure
is the gateway's, not a model's. Per backend (``embeddings.backend``):

* ``local``: MiniLM in the gateway's workers (NumPy);
* ``triton``: a Triton of its own serving only the ``embedder`` model; the gateway sends it the
  prompts (``embeddings.backend: triton``), a worker's concurrent prompts as one request;
* ``triton-unbatched``: the same with ``batch_in_gateway: false``, one request per prompt, merged
  by Triton's dynamic batcher only.

For each connection count: ``wrk -t1 -c<n> --latency`` (``benchmarks/wrk/bodies.lua``: every body
once), p50/p99 and req/s, and the CPU seconds the gateway's workers and Triton used per request
(``/proc/<pid>/stat`` before and after, children included). Everything binds 127.0.0.1; every
process started here is stopped by its own id. Not run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc.commands.envoy_config import envoy_binary, render_envoy_config  # noqa: E402
from extproc.commands.stack import ManagedProcess, grpc_serving, http_ok, service_command  # noqa: E402
from extproc.commands.tritonserver import TritonProcess, free_port  # noqa: E402

LUA = ROOT / "benchmarks" / "wrk" / "bodies.lua"
STUB = ROOT / "benchmarks" / "stub_upstream.py"
TIERS = {name: {"model": "stub-model", "kind": "openai", "aliases": [], "default_max_tokens": 16}
         for name in ("small", "medium", "large")}
QUESTIONS = [
    "Summarise the plot of a novel about a lighthouse keeper",
    "Prove that the square root of two is irrational",
    "Write a haiku about autumn rain",
    "Explain how a hash map handles collisions, with trade-offs",
    "Translate 'good morning, how are you' into Spanish",
    "Design a rate limiter for a distributed API gateway and justify each choice",
    "What is the capital of Australia",
    "Compare the causes of the first and second world wars in depth",
    "Give me three names for a bakery",
    "Derive the closed form of the Fibonacci sequence step by step",
]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def write_config(path: Path, workers: int, embeddings: dict) -> Path:
    cfg = {
        "server": {"workers": workers, "grace_seconds": 2},
        "tiers": TIERS, "default_tier": "small",
        "plugins": [
            {"name": "route_rules"},
            {"name": "semantic_routes", "on_error": "fail_open", "settings": {"threshold": 0.5, "k": 3}},
            {"name": "learned_router", "on_error": "fail_open"},
            {"name": "model_tiers"},
        ],
    }
    cfg["embeddings"] = embeddings
    path.write_text(yaml.safe_dump(cfg))
    return path


def envoy_config(dest: Path, *, listen: int, admin: int, extproc: int, stub: int) -> Path:
    """envoy/envoy.yaml with every tier cluster on the stub and no Triton health check."""
    config = yaml.safe_load(render_envoy_config(ROOT / "envoy" / "envoy.yaml", listen_port=listen, admin_port=admin,
                                                extproc_port=extproc, triton_port=stub, passthrough_port=stub))
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"].startswith("tier_"):
            cluster.pop("health_checks", None)
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def bodies(n: int, tag: str) -> list[bytes]:
    return [json.dumps({"model": "auto", "max_tokens": 16, "messages": [
        {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({tag} request {i})"}]},
        separators=(",", ":")).encode() for i in range(n)]


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its threads (and waited-for children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children(p)
    return tree


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


def wrk(port: int, data: list[bytes], connections: int, duration: float, work: Path) -> dict:
    path = work / f"bodies-{connections}-{time.monotonic_ns()}.jsonl"
    path.write_bytes(b"\n".join(data) + b"\n")
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "--latency", "-s", str(LUA),
                          f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                         env={**os.environ, "BENCH_BODIES": str(path)}, timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    return json.loads(line[len("WRK_JSON "):])


def post(port: int, data: bytes) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=data,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return {"status": r.status, "tier": r.headers.get("x-extproc-tier-chosen") or r.headers.get("x-extproc-tier")}


def run_backend(backend: str, args, work: Path) -> dict:
    ports = {k: free_port() for k in ("listen", "admin", "extproc", "stub")}
    logs = work / backend / "logs"
    procs: list = []
    triton = None
    embeddings = {"runtime": args.runtime}
    result: dict = {"backend": backend, "cases": {}}
    try:
        stub = ManagedProcess("stub", [sys.executable, str(STUB), "--port", str(ports["stub"])], logs / "stub.log")
        stub.start()
        procs.append(stub)
        if backend.startswith("triton"):
            t_ports = {k: free_port() for k in ("http", "grpc", "metrics")}
            triton = TritonProcess(ROOT / "triton_models", http_port=t_ports["http"], grpc_port=t_ports["grpc"],
                                   metrics_port=t_ports["metrics"], work_dir=work / backend / "triton",
                                   log_path=logs / "triton.log", models=["embedder"])
            triton.start()
            triton.wait_ready(timeout=180)
            embeddings.update(backend="triton", triton_url=triton.http_url, timeout_seconds=2.0,
                              on_unavailable="fail", batch_in_gateway=backend != "triton-unbatched")
        config = write_config(work / backend / "config.yaml", args.workers, embeddings)
        service = ManagedProcess("service", service_command(config, ports["extproc"], args.workers, None),
                                 logs / "extproc.log")
        service.start()
        procs.append(service)
        service.wait_until(lambda: grpc_serving(ports["extproc"]), 120, "serving")
        envoy = ManagedProcess("envoy", [envoy_binary(), "-c", str(envoy_config(
            work / backend / "envoy.yaml", listen=ports["listen"], admin=ports["admin"], extproc=ports["extproc"],
            stub=ports["stub"])), "--use-dynamic-base-id", "--log-level", "warn", "--concurrency", "2"],
            logs / "envoy.log")
        envoy.start()
        procs.append(envoy)
        envoy.wait_until(lambda: http_ok(f"http://127.0.0.1:{ports['admin']}/ready"), 30, "ready")
        for data in bodies(40, f"{backend} warm-up"):
            post(ports["listen"], data)
        gateway_pids = process_tree(service.proc.pid)
        triton_pids = process_tree(triton.pid) if triton is not None else []
        for n in args.connections:
            data = bodies(args.bodies, f"{backend} c{n} {time.time_ns()}")
            load = os.getloadavg()
            g0, t0 = tree_cpu(gateway_pids), tree_cpu(triton_pids)
            r = wrk(ports["listen"], data, n, args.duration, work)
            g1, t1 = tree_cpu(gateway_pids), tree_cpu(triton_pids)
            if r["requests"] >= len(data):
                print(f"warning: {r['requests']} requests >= {len(data)} bodies: some prompts repeated "
                      f"(raise --bodies)", flush=True)
            r.update(load=load, gateway_cpu_ms_per_request=(g1 - g0) * 1000 / max(r["requests"], 1),
                     triton_cpu_ms_per_request=(t1 - t0) * 1000 / max(r["requests"], 1),
                     rps=r["requests"] / (r["duration_us"] / 1e6))
            result["cases"][n] = r
            print(f"{backend:<16} c={n:<3} load {load[0]:.2f}  {r['requests']:>6} req  {r['rps']:>7.1f} req/s  "
                  f"p50 {r['p50_us'] / 1000:7.2f} ms  p99 {r['p99_us'] / 1000:7.2f} ms  non-2xx {r['errors_status']}  "
                  f"CPU/req: gateway {r['gateway_cpu_ms_per_request']:.2f} ms, "
                  f"triton {r['triton_cpu_ms_per_request']:.2f} ms", flush=True)
    finally:
        for p in reversed(procs):
            p.stop()
        if triton is not None:
            triton.stop()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embeddings", default="local", help="comma-separated: local, triton, triton-unbatched")
    ap.add_argument("--connections", default="1,16", help="comma-separated connection counts")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    ap.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    ap.add_argument("--runtime", default="auto", help="embeddings.runtime of the workers: auto, numpy, "
                    "onnxruntime, onnxruntime-int8 (Triton's embedder: its config.pbtxt parameter)")
    ap.add_argument("--bodies", type=int, default=20000, help="distinct prompts per run (none repeats)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.connections = [int(c) for c in args.connections.split(",")]
    if shutil.which("wrk") is None:
        sys.exit("wrk is required (scripts/ensure-debs.sh wrk)")
    work = Path(tempfile.mkdtemp(prefix="bench-auto-"))
    results = []
    try:
        for backend in args.embeddings.split(","):
            results.append(run_backend(backend.strip(), args, work))
    finally:
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
