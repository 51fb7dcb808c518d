"""Cache latency through the whole stack at 1 client: exact hits and semantic lookups, end to end.

    python benchmarks/bench_cache.py [--duration 10] [--out cache.json]

Starts Triton (the CPU tiers), the ext_proc service (2 workers) and Envoy with
``exact_cache``, ``semantic_cache`` and ``coalescing`` configured, and a Redis of its own; then, with
``wrk -t1 -c1 --latency`` (``benchmarks/wrk/bodies.lua``), for ``--duration`` seconds each:

* **floor**: a request the service refuses at the request body (400, no policy work): what any
  answer from the request phase costs through Envoy and the ext_proc hop;
* **exact hit, Redis state**: the same deterministic request, answered from the exact cache;
* **exact hit, memory state**: the same with ``state.redis_url`` unset (the service restarted);
* **semantic hit, Redis state**: paraphrases of stored questions, each lookup embedding its text
  afresh (``reuse_embeddings: false``: no embedding is reused), so every request pays exact miss +
  MiniLM encoding + vector search + answer fetch. The paraphrases are the positive pairs of
  ``benchmarks/data/semantic_pairs.jsonl`` whose ``a`` was stored and whose ``b`` hits.

Then, in process (``GatewayHarness`` on the same Redis), the policies' own lookup time
(``ctx.timings_ms``) for an exact hit, a semantic hit and a semantic miss, without Envoy and gRPC.
Everything binds to 127.0.0.1; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc.commands.stack import Stack, StackPorts  # noqa: E402
from extproc.commands.tritonserver import free_port  # noqa: E402

LUA = ROOT / "benchmarks" / "wrk" / "bodies.lua"
PAIRS = ROOT / "benchmarks" / "data" / "semantic_pairs.jsonl"

TIERS = {
    "small": {"model": "llm-small", "aliases": ["llm-small"], "default_max_tokens": 16,
              "price": {"prompt_per_1k": 0.0001, "completion_per_1k": 0.0002}},
    "medium": {"model": "llm-medium", "aliases": ["llm-medium"], "default_max_tokens": 16},
    "large": {"model": "llm-large", "aliases": ["llm-large"], "default_max_tokens": 16},
}


def write_config(path: Path, redis_url: str | None) -> Path:
    import yaml

    cfg = {
        "server": {"workers": 2, "grace_seconds": 2},
        "tiers": TIERS, "default_tier": "small",
        "plugins": [
            {"name": "model_tiers"},
            {"name": "exact_cache", "on_error": "fail_open"},
            {"name": "semantic_cache", "on_error": "fail_open", "settings": {"reuse_embeddings": False}},
            {"name": "coalescing", "on_error": "fail_open"},
        ],
        "state": {"redis_url": redis_url, "key_prefix": "bench-cache:"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def body(text: str) -> bytes:
    return json.dumps({"model": "small", "temperature": 0, "max_tokens": 16,
                       "messages": [{"role": "user", "content": text}]}, separators=(",", ":")).encode()


def post(port: int, data: bytes) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=data,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status, r.headers.get("x-extproc-cache", "")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-extproc-cache", "")


def start_redis(work: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is required")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("redis-server did not start")


def wrk(port: int, bodies: list[bytes], duration: float, work: Path) -> dict:
    path = work / f"bodies-{len(bodies)}.jsonl"
    path.write_bytes(b"\n".join(bodies) + b"\n")
    env = {**os.environ, "BENCH_BODIES": str(path)}
    out = subprocess.run(["wrk", "-t1", "-c1", f"-d{int(duration)}s", "--latency", "-s", str(LUA),
                          f"http://127.0.0.1:{port}"], capture_output=True, text=True, env=env,
                         timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    return json.loads(line[len("WRK_JSON "):])


def until_hits(port: int, data: bytes, want: str, n: int = 8, timeout: float = 30) -> None:
    """Send ``data`` until ``n`` answers in a row say ``x-extproc-cache: want`` (every worker warm)."""
    deadline, streak = time.monotonic() + timeout, 0
    while streak < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"never got {n} x '{want}' in a row")
        status, cache = post(port, data)
        streak = streak + 1 if status == 200 and cache == want else 0


def semantic_bodies(port: int) -> tuple[list[bytes], int, int]:
    """Store every positive pair's ``a``; keep the ``b`` texts that hit semantically."""
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    positives = [p for p in pairs if p["same"]]
    for a in sorted({p["a"] for p in positives}):
        post(port, body(a))
    kept = []
    for p in positives:
        data = body(p["b"])
        if post(port, data) == (200, "semantic_hit"):
            kept.append(data)
    return kept, len(positives), len({p["a"] for p in positives})


async def in_process(redis_url: str, rounds: int) -> dict:
    """The policies' own lookup time (ctx.timings_ms), without Envoy and gRPC."""
    from extproc.framework.config import load_config
    from extproc.framework.testing import GatewayHarness

    cfg = load_config(None, overrides={
        "plugins": [{"name": "model_tiers"}, {"name": "exact_cache"},
                    {"name": "semantic_cache", "settings": {"reuse_embeddings": False}}],
        "state": {"redis_url": redis_url, "key_prefix": "bench-inproc:"}})
    out: dict[str, list[float]] = {"exact hit": [], "semantic hit": [], "semantic miss": []}
    async with GatewayHarness(config=cfg) as gw:
        base = {"model": "small", "temperature": 0, "max_tokens": 16}
        await gw.send({**base, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        for i in range(rounds):
            r = await gw.send({**base, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
            out["exact hit"].append(r.ctx.timings_ms["exact_cache"])
            r = await gw.send({**base, "messages": [{"role": "user", "content":
                                                      f"Which city is the capital of France?{' ' * (i % 3)}"
                                                      f"{'Thanks.' if i % 2 else ''}"}]})
            if r.ctx.cache_status == "semantic_hit":
                out["semantic hit"].append(r.ctx.timings_ms["exact_cache"] + r.ctx.timings_ms["semantic_cache"])
            r = await gw.send({**base, "messages": [{"role": "user", "content": f"Unrelated question number {i}"}]},
                              headers={"cache-control": "no-store"})
            out["semantic miss"].append(r.ctx.timings_ms["exact_cache"] + r.ctx.timings_ms["semantic_cache"])
    return {k: {"n": len(v), "p50_ms": statistics.median(v), "p99_ms": sorted(v)[int(len(v) * 0.99) - 1]}
            for k, v in out.items() if v}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk measurement")
    ap.add_argument("--inproc-rounds", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk is required (scripts/ensure-debs.sh wrk)")
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    redis, redis_url = start_redis(work)
    stack = Stack(work, ports=StackPorts(0, 0, 0, 0, 0, 0, 0), config_path=write_config(work / "redis.yaml", redis_url),
                  workers=2)
    results: dict = {"load_before": os.getloadavg()}
    try:
        t0 = time.monotonic()
        stack.start()
        port = stack.ports.listen
        print(f"stack up in {time.monotonic() - t0:.1f}s (Triton, service x2, Envoy); Redis {redis_url}", flush=True)

        floor = json.dumps({"model": "small", "temperature": 0}).encode()  # 400 (no messages) at parse
        results["floor: a 400 answered at request body"] = wrk(port, [floor], args.duration, work)

        exact = body("Say hello in five words.")
        until_hits(port, exact, "hit")
        results["exact hit, Redis state"] = wrk(port, [exact], args.duration, work)

        bodies, positives, stored = semantic_bodies(port)
        print(f"semantic: stored {stored} questions; {len(bodies)} of {positives} paraphrases hit "
              f"(those are the bodies measured)", flush=True)
        results["semantic hit, Redis state"] = wrk(port, bodies, args.duration, work)
        results["semantic bodies"] = len(bodies)

        results["in process (Redis)"] = asyncio.run(in_process(redis_url, args.inproc_rounds))

        stack.stop_service()
        stack.config_path, stack.redis_url = write_config(work / "memory.yaml", None), None
        stack.start_service()
        until_hits(port, exact, "hit", timeout=60)
        results["exact hit, memory state"] = wrk(port, [exact], args.duration, work)
    finally:
        stack.stop()
        os.killpg(redis.pid, 15)
        redis.wait(5)
    results["load_after"] = os.getloadavg()

    print(f"\nwrk -t1 -c1 -d{int(args.duration)}s through Envoy + ext_proc (2 workers); load average "
          f"before {results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f} (2 shared vCPUs)")
    print(f"{'case':<38} {'requests':>9} {'non-2xx':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name in ("floor: a 400 answered at request body", "exact hit, Redis state", "exact hit, memory state",
                 "semantic hit, Redis state"):
        r = results[name]
        print(f"{name:<38} {r['requests']:>9} {r['errors_status']:>8} {r['p50_us'] / 1000:>8.3f} "
              f"{r['p90_us'] / 1000:>8.3f} {r['p99_us'] / 1000:>8.3f} {r['lat_mean_us'] / 1000:>8.3f}")
    print("\nin process, the policies' own lookup time (ctx.timings_ms), Redis state:")
    for name, r in results["in process (Redis)"].items():
        print(f"  {name:<16} n={r['n']:<5} p50 {r['p50_ms']:.3f} ms   p99 {r['p99_ms']:.3f} ms")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
