#!/usr/bin/env python3
"""Does the gateway's memory stay flat under sustained load? A soak run through real Envoy.

Starts the stub upstream (benchmarks/stub_upstream.py, streams paced so that a client can hang up
mid-stream), the real service (`extproc serve`, 2 workers, memory state, the embedded default
config's plugin chain plus the stub as the `openai`-kind tier `passthrough`, exactly like
bench_extproc_hop.py) and real Envoy, then drives sustained load for --duration seconds from
--clients keep-alive connections with a seeded mix of DISTINCT requests:

  distinct         chat, temperature 0, a new prompt every time (a cache miss that gets stored)
  distinct_stream  the same, "stream": true (half with stream_options.include_usage)
  repeat           one of the last 256 deterministic prompts again (exact cache hit)
  no_cache         a repeat with Cache-Control: no-cache (bypass; the entry is refreshed)
  sampled          temperature 0.8, new prompt (neither served from nor stored in the cache)
  completions      /v1/completions, new prompt
  idem_new         a new Idempotency-Key; idem_replay: a recent key with its body (replayed);
                   idem_conflict: a recent key with another body (422)
  auto             model "auto": the routers embed the prompt (MiniLM) and pick a Triton tier,
                   which is the stub here and answers 404 (an upstream error, mapped to OpenAI's)
  bad_json, bad_field, unknown_model, bad_cache_control, bad_idem_key   4xx, OpenAI-style
  hangup           a streamed request on a new connection, closed after the first body chunk

Every --interval seconds it samples each worker's RSS (VmRSS from /proc/<pid>/status), and
Envoy's. It prints the RSS-over-time table, the growth of each worker between the end of the
warm-up (--warmup) and the end, a least-squares slope over the measured part, requests served
by kind and status, and what each worker holds (store entries/bytes against their bounds, from
the workers' own diagnostics: extproc/observability/memdiag.py, $EXTPROC_MEMDIAG_DIR).

    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_soak_memory.py            # 120 s
    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_soak_memory.py --duration 600 --cache-mib 64
    ... --tracemalloc 1 --duration 90     # find what grows (slow: tracemalloc in the workers)

--cache-mib and --idempotency-mib bound the exact cache's and the idempotency store's per-worker
memory (default 1 and 0.25 MiB, so that they fill during the warm-up and the run shows them at
their bound; the shipped default is 64 MiB each, which takes tens of minutes of distinct traffic
to fill: RSS then grows until they are full, which is the bound working, not a leak). Exit status 2 when a
worker grew more than --max-growth-mib after the warm-up. Everything binds 127.0.0.1 and every
process started here is stopped by its own process id. Nothing here is run by the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_extproc_hop as hop  # noqa: E402  (processes, Envoy and service start-up, config)

from extproc.observability.memdiag import rss_kib  # noqa: E402

# kind -> weight (per cent of requests); see the module docstring
MIX = {
    "distinct": 30, "distinct_stream": 10, "repeat": 14, "no_cache": 2, "sampled": 8, "completions": 4,
    "idem_new": 6, "idem_replay": 3, "idem_conflict": 1, "auto": 2,
    "bad_json": 2, "bad_field": 2, "unknown_model": 2, "bad_cache_control": 1, "bad_idem_key": 1,
    "hangup": 12,
}
WORDS = ("gateway budget token cache stream tier latency envoy triton prompt answer policy worker memory "
         "request model route cost tenant window vector batch queue retry limit record metric label").split()


# --------------------------------------------------------------------------- HTTP/1.1 client


class Closed(Exception):
    pass


async def read_response(reader: asyncio.StreamReader, *, first_chunk_only: bool = False):
    """(status, headers, body) of one HTTP/1.1 response; with first_chunk_only, stop after the first
    body chunk (the caller then hangs up)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise Closed(str(exc)) from exc
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = bytearray()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            body += (await reader.readexactly(size + 2))[:-2]
            if first_chunk_only:
                break
    elif "content-length" in headers:
        body += await reader.readexactly(int(headers["content-length"]))
    else:
        body += await reader.read()
    return status, headers, bytes(body)


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    out = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json",
           f"content-length: {len(body)}"]
    out += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(out) + "\r\n\r\n").encode() + body


# --------------------------------------------------------------------------- the request mix


class Mix:
    """Builds the next request of a kind; distinct prompts from a counter and a seeded RNG."""

    def __init__(self, seed: int, run: str, weights: dict[str, float] | None = None):
        self.rng = random.Random(seed)
        self.run = run
        self.n = 0
        self.recent: list[bytes] = []  # deterministic bodies sent, for repeats
        self.idem: list[tuple[str, bytes]] = []  # (key, body) of completed idempotent requests
        kinds, weights = zip(*(weights or MIX).items())
        self.kinds, self.weights = list(kinds), list(weights)

    def prompt(self) -> str:
        self.n += 1
        words = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(8, 60)))
        return f"soak {self.run} #{self.n}: {words}?"

    def chat(self, *, model: str = "stub", temperature: float | None = 0, stream: bool = False, **extra) -> bytes:
        body: dict = {"model": model, "messages": [{"role": "user", "content": self.prompt()}],
                      "max_tokens": self.rng.choice((16, 32, 64))}
        if self.rng.random() < 0.3:
            body["messages"].insert(0, {"role": "system", "content": "You are terse."})
        if temperature is not None:
            body["temperature"] = temperature
        if stream:
            body["stream"] = True
            if self.rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        body.update(extra)
        return json.dumps(body).encode()

    def remember(self, body: bytes) -> None:
        self.recent.append(body)
        if len(self.recent) > 256:
            del self.recent[: len(self.recent) - 256]

    def next(self) -> tuple[str, str, bytes, dict[str, str]]:
        """(kind, path, body, headers)."""
        kind = self.rng.choices(self.kinds, self.weights)[0]
        path, headers = "/v1/chat/completions", {}
        if kind in ("repeat", "no_cache") and not self.recent:
            kind = "distinct"
        if kind in ("idem_replay", "idem_conflict") and not self.idem:
            kind = "idem_new"
        if kind == "distinct":
            body = self.chat()
            self.remember(body)
        elif kind == "distinct_stream":
            body = self.chat(stream=True)
            self.remember(body)
        elif kind == "repeat":
            body = self.rng.choice(self.recent)
        elif kind == "no_cache":
            body, headers = self.rng.choice(self.recent), {"cache-control": "no-cache"}
        elif kind == "sampled":
            body = self.chat(temperature=0.8)
        elif kind == "completions":
            path = "/v1/completions"
            body = json.dumps({"model": "stub", "prompt": self.prompt(), "max_tokens": 16, "temperature": 0}).encode()
        elif kind == "idem_new":
            body = self.chat(temperature=0.7)
            headers = {"idempotency-key": f"{self.run}-{self.n}"}
        elif kind == "idem_replay":
            key, body = self.rng.choice(self.idem)
            headers = {"idempotency-key": key}
        elif kind == "idem_conflict":
            key, _ = self.rng.choice(self.idem)
            body, headers = self.chat(temperature=0.7), {"idempotency-key": key}
        elif kind == "auto":
            body = self.chat(model="auto")
        elif kind == "bad_json":
            body = b'{"model": "stub", "messages": [' + str(self.n).encode()
        elif kind == "bad_field":
            body = json.dumps({"model": "stub", "messages": self.prompt()}).encode()
        elif kind == "unknown_model":
            body = self.chat(model=f"no-such-model-{self.n}")
        elif kind == "bad_cache_control":
            body, headers = self.chat(), {"cache-control": f"max-age=soon{self.n}"}
        elif kind == "bad_idem_key":
            body, headers = self.chat(), {"idempotency-key": "k" * 300}
        else:  # hangup
            body = self.chat(stream=True)
        return kind, path, body, headers


class Load:
    """--clients keep-alive connections sending the mix until the deadline; hang-ups use their own."""

    def __init__(self, port: int, clients: int, seed: int, run: str, weights: dict[str, float] | None = None):
        self.port, self.clients, self.seed, self.run_id = port, clients, seed, run
        self.weights = weights
        self.by_kind: dict[str, Counter] = defaultdict(Counter)  # kind -> status -> count
        self.errors: Counter = Counter()
        self.samples_of_errors: dict[str, str] = {}
        self.done = 0
        self.limit: int | None = None  #: stop once this many requests are answered (--requests)

    async def _client(self, i: int, deadline: float) -> None:
        mix = Mix(self.seed * 1000 + i, f"{self.run_id}c{i}", self.weights)
        reader = writer = None
        while time.monotonic() < deadline and (self.limit is None or self.done < self.limit):
            kind, path, body, headers = mix.next()
            try:
                if kind == "hangup":
                    await self._hang_up(path, body, headers)
                    continue
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(http_request(path, body, headers))
                status, rheaders, rbody = await asyncio.wait_for(read_response(reader), 30)
                if rheaders.get("connection", "").lower() == "close":
                    writer.close()
                    reader = writer = None
            except (Closed, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                self.errors[f"{kind}: {type(exc).__name__}"] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            self.by_kind[kind][status] += 1
            self.done += 1
            if status >= 400 and not (400 <= status < 500 and b'"error"' in rbody):
                self.samples_of_errors.setdefault(f"{kind} {status}", rbody[:200].decode("utf-8", "replace"))
            if status == 200 and kind == "idem_new":
                mix.idem.append((headers["idempotency-key"], body))
                if len(mix.idem) > 64:
                    del mix.idem[0]
        if writer is not None:
            writer.close()

    async def _hang_up(self, path: str, body: bytes, headers: dict) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(http_request(path, body, headers))
            status, _, _ = await asyncio.wait_for(read_response(reader, first_chunk_only=True), 30)
            self.by_kind["hangup"][status] += 1
            self.done += 1
        finally:
            writer.transport.abort()  # no FIN handshake: the client is simply gone

    async def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(self._client(i, deadline) for i in range(self.clients)))


# --------------------------------------------------------------------------- sampling


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return sorted(out)


def worker_pids(service_pid: int) -> list[int]:
    """The service's worker processes (multiprocessing spawn children; not its resource tracker)."""
    pids = []
    for pid in children(service_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            pids.append(pid)
    return pids


def slope_mib_per_min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) in MiB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return 0.0 if den == 0 else sum((t - mt) * (v - mv) for t, v in points) / den * 60 / 1024


def read_diag(directory: Path) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for path in sorted(directory.glob("worker-*.jsonl")):
        lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        if lines:
            out[lines[0]["pid"]] = lines
    return out


def at(lines: list[dict], t: float) -> dict | None:
    """The diagnostics line closest to t seconds after the worker started."""
    return min(lines, key=lambda ln: abs(ln["t"] - t)) if lines else None


# --------------------------------------------------------------------------- main


def soak_config(work: Path, args) -> Path:
    import yaml

    path = hop.extproc_config(work, args.workers, [])
    cfg = yaml.safe_load(path.read_text())
    caps = {"exact_cache": args.cache_mib, "idempotency": args.idempotency_mib}
    for entry in cfg["plugins"]:
        settings = entry.setdefault("settings", None) or {}
        if entry["name"] in caps:
            settings["memory_max_bytes"] = int(caps[entry["name"]] * 1024 * 1024)
        if entry["name"] == "usage_records":
            settings.update({"path": str(work / "usage" / "usage.jsonl"), "max_file_bytes": 16 * 1024 * 1024,
                             "backups": 1})
        entry["settings"] = settings
    cfg["server"]["max_streams_per_worker"] = args.max_streams_per_worker
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load in all (warm-up included)")
    ap.add_argument("--warmup", type=float, default=40.0, help="seconds of load before growth is measured")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--clients", type=int, default=16, help="concurrent keep-alive client connections")
    ap.add_argument("--workers", type=int, default=2, help="service worker processes")
    ap.add_argument("--envoy-concurrency", type=int, default=4,
                    help="Envoy worker threads; each opens its own gRPC connection to the service, which the "
                    "kernel hands to one worker (SO_REUSEPORT): with 2 threads both often land on one worker")
    ap.add_argument("--cache-mib", type=float, default=1.0, help="per-worker memory bound of the exact cache")
    ap.add_argument("--idempotency-mib", type=float, default=0.25,
                    help="per-worker memory bound of the idempotency store")
    ap.add_argument("--stream-delay-ms", type=float, default=3.0, help="the stub's pause between SSE events")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                    help="tracemalloc in the workers, top growing lines after the warm-up (slow)")
    ap.add_argument("--objects", action="store_true", help="count live objects by type in the workers (gc)")
    ap.add_argument("--max-growth-mib", type=float, default=8.0, help="exit 2 if a worker grew more after warm-up")
    ap.add_argument("--mix", help="only these kinds, with these weights: e.g. sampled=1 or distinct=3,hangup=1 "
                    "(to find which kind of traffic makes memory grow)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--requests", type=int, help="stop once this many requests are answered (--duration bounds it)")
    ap.add_argument("--max-streams-per-worker", type=int, default=100_000,
                    help="server.max_streams_per_worker (the shipped default; 0: workers are never recycled)")
    ap.add_argument("--work-dir", help="logs, configs, diagnostics (default: a temp dir)")
    ap.add_argument("--out", help="write samples and results as JSON here")
    args = ap.parse_args(argv)
    if args.warmup >= args.duration:
        ap.error("--warmup must be shorter than --duration")
    weights = None
    if args.mix:
        try:
            weights = {k.strip(): float(v) for k, v in (p.split("=") for p in args.mix.split(","))}
        except ValueError:
            ap.error("--mix: kind=weight,...")
        if set(weights) - set(MIX):
            ap.error(f"--mix: unknown kind(s) {', '.join(sorted(set(weights) - set(MIX)))}")

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    diag_dir = work / "memdiag"
    print(f"work dir: {work}  (logs in {work / 'logs'})", flush=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
          f"{args.duration:.0f} s of load, warm-up {args.warmup:.0f} s, {args.clients} clients, "
          f"{args.workers} workers; mix {args.mix or 'all kinds'}; per worker, exact cache bound {args.cache_mib:g} MiB, "
          f"idempotency store {args.idempotency_mib:g} MiB", flush=True)

    procs: list[hop.Proc] = []
    try:
        stub_port = hop.free_port()
        procs.append(hop.Proc("stub", [sys.executable, str(hop.STUB), "--port", str(stub_port),
                                       "--stream-delay-ms", str(args.stream_delay_ms)],
                              work / "logs" / "stub.log").start())
        hop.wait_for(lambda: hop.http_get_ok(f"http://127.0.0.1:{stub_port}/health"), 20, "stub", procs)

        config = soak_config(work, args)
        port = hop.free_port()
        env = dict(os.environ, EXTPROC_MEMDIAG_DIR=str(diag_dir), EXTPROC_MEMDIAG_SECONDS=str(args.interval),
                   EXTPROC_MEMDIAG_BASELINE_SECONDS=str(args.warmup + 5))
        if args.tracemalloc:
            env["EXTPROC_MEMDIAG_TRACEMALLOC"] = str(args.tracemalloc)
        if args.objects:
            env["EXTPROC_MEMDIAG_OBJECTS"] = "1"
        argv_svc = [str(Path(sys.executable).parent / "extproc"), "serve", "--config", str(config),
                    "--port", str(port), "--workers", str(args.workers)]
        svc = hop.Proc("extproc", argv_svc, work / "logs" / "extproc.log", env=env).start()
        procs.append(svc)
        hop.wait_for(lambda: hop.grpc_serving(port), 60, "ext_proc service SERVING", procs)
        listen, admin = hop.free_port(), hop.free_port()
        envoy_cfg = hop.render(ROOT / "envoy" / "envoy.yaml", work / "envoy.yaml", listen=listen, admin=admin,
                               extproc=port, stub=stub_port)
        envoy = hop.start_envoy(envoy_cfg, work, "envoy", admin, args.envoy_concurrency, procs)
        procs.append(envoy)
        url = f"http://127.0.0.1:{listen}"
        hop.wait_for(lambda: hop.chat_ok(url), 30, "a chat completion through Envoy + ext_proc", procs)
        workers = worker_pids(svc.popen.pid)
        print(f"service: {shlex.join(argv_svc)}\nworkers: {workers}  envoy: {envoy.popen.pid}", flush=True)
        if len(workers) != args.workers:
            raise RuntimeError(f"expected {args.workers} workers under pid {svc.popen.pid}, found {workers}")

        load = Load(listen, args.clients, args.seed, f"r{os.getpid()}", weights)
        load.limit = args.requests
        samples: list[dict] = []

        async def sampler(t0: float) -> None:
            while True:
                current = worker_pids(svc.popen.pid)  # recycled workers are replaced by new pids
                rss = {pid: rss_kib(pid) for pid in current}
                row = {"t": time.monotonic() - t0, "requests": load.done, "rss": rss, "envoy": rss_kib(envoy.popen.pid),
                       "worker_max": max((v or 0 for v in rss.values()), default=0),
                       "worker_mean": sum(v or 0 for v in rss.values()) / max(1, len(rss))}
                samples.append(row)
                if row["t"] >= args.duration or (load.limit is not None and load.done >= load.limit):
                    return
                await asyncio.sleep(max(0.0, args.interval * len(samples) - (time.monotonic() - t0)))

        async def drive() -> None:
            t0 = time.monotonic()
            task = asyncio.get_running_loop().create_task(sampler(t0))
            await load.run(args.duration)
            await task

        started = time.monotonic()
        asyncio.run(drive())
        elapsed = time.monotonic() - started
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited during the run:\n{p.tail()}")
        load_after = os.getloadavg()
        time.sleep(args.interval + 0.5)  # one more diagnostics line from each worker
        diag = read_diag(diag_dir)
    finally:
        for p in reversed(procs):
            p.stop()

    # ------------------------------------------------------------------ report
    print(f"\nRSS over time (MiB; VmRSS of the service's workers, largest and mean, and of Envoy); "
          f"requests = answered by then; pids = workers seen so far (recycling replaces them)\n")
    head = f"{'t (s)':>6} {'requests':>9} {'pids':>5} {'worker max':>11} {'worker mean':>12} {'envoy':>8}"
    print(head)
    print("-" * len(head))
    seen: set[int] = set()
    for row in samples:
        seen |= set(row["rss"])
        mark = " <- end of warm-up" if abs(row["t"] - args.warmup) < args.interval / 2 else ""
        print(f"{row['t']:>6.0f} {row['requests']:>9} {len(seen):>5} {row['worker_max'] / 1024:>11.1f} "
              f"{row['worker_mean'] / 1024:>12.1f} {(row['envoy'] or 0) / 1024:>8.1f}{mark}")

    warm = min(samples, key=lambda r: abs(r["t"] - args.warmup))
    last = samples[-1]
    measured = [r for r in samples if r["t"] >= warm["t"]]
    half = measured[len(measured) // 2]
    peak = max(r["worker_max"] for r in measured)
    print(f"\ngrowth after the warm-up ({warm['t']:.0f} s, {warm['requests']} requests -> {last['t']:.0f} s, "
          f"{last['requests']} requests):")
    results = {}
    for key in ("worker_max", "worker_mean"):
        grow = (last[key] - warm[key]) / 1024
        results[key] = {"warm_mib": warm[key] / 1024, "end_mib": last[key] / 1024, "growth_mib": grow,
                        "growth_pct": 100 * (last[key] - warm[key]) / warm[key] if warm[key] else 0.0,
                        "second_half_mib": (last[key] - half[key]) / 1024,
                        "slope_mib_per_min": slope_mib_per_min([(r["t"], r[key]) for r in measured])}
        r = results[key]
        print(f"  {key.replace('_', ' ')}: {r['warm_mib']:.1f} -> {r['end_mib']:.1f} MiB ({r['growth_mib']:+.1f} MiB, "
              f"{r['growth_pct']:+.1f} %; second half {r['second_half_mib']:+.1f} MiB; slope "
              f"{r['slope_mib_per_min']:+.2f} MiB/min)")
    results["peak_worker_mib"] = peak / 1024
    results["peak_growth_pct"] = 100 * (peak - warm["worker_max"]) / warm["worker_max"] if warm["worker_max"] else 0.0
    results["worker_pids_seen"] = len(seen)
    print(f"  largest worker at any sample after the warm-up: {peak / 1024:.1f} MiB "
          f"({results['peak_growth_pct']:+.1f} % over the largest at the warm-up); {len(seen)} worker pids seen "
          f"({len(seen) - args.workers} replacements)")
    worst = max(results["worker_max"]["growth_mib"], (peak - warm["worker_max"]) / 1024)
    workers = sorted(last["rss"])
    egrow = ((last["envoy"] or 0) - (warm["envoy"] or 0)) / 1024
    print(f"  envoy: {(warm['envoy'] or 0) / 1024:.1f} -> {(last['envoy'] or 0) / 1024:.1f} MiB ({egrow:+.1f} MiB)")

    total = sum(sum(c.values()) for c in load.by_kind.values())
    print(f"\nrequests answered: {total} in {elapsed:.0f} s ({total / elapsed:.0f} req/s); "
          f"client errors: {sum(load.errors.values())}; load average at the end "
          f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    for kind in MIX:
        counts = load.by_kind.get(kind)
        if counts:
            print(f"  {kind:<18} " + ", ".join(f"{status}: {n}" for status, n in sorted(counts.items())))
    for what, n in load.errors.most_common(8):
        print(f"  client error  {what}: {n}")
    for what, body in list(load.samples_of_errors.items())[:8]:
        print(f"  non-OpenAI error body ({what}): {body}")

    print("\nwhat each worker holds (its own diagnostics, extproc/observability/memdiag.py): end of warm-up -> end")
    for pid in workers:
        lines = diag.get(pid, [])
        a, b = at(lines, args.warmup + 5), (lines[-1] if lines else None)
        if not a or not b:
            print(f"  worker {pid}: no diagnostics")
            continue
        print(f"  worker {pid}: tasks {a['tasks']} -> {b['tasks']}, streams in flight {a['active_streams']} -> "
              f"{b['active_streams']}, Python blocks {a['py_blocks']} -> {b['py_blocks']}; ext_proc streams "
              f"{b.get('streams')}, of which ended cancelled by Envoy {b.get('streams_cancelled')}")
        if a.get("malloc") and b.get("malloc"):
            ma, mb = a["malloc"], b["malloc"]
            print(f"    C heap (mallinfo2, MiB): in use {ma['in_use'] / 2**20:.1f} -> {mb['in_use'] / 2**20:.1f}, "
                  f"held free {ma['free'] / 2**20:.1f} -> {mb['free'] / 2**20:.1f}, "
                  f"mmap {ma['mmap'] / 2**20:.1f} -> {mb['mmap'] / 2**20:.1f}")
        for name, value in b["holdings"].items():
            before = a["holdings"].get(name)
            if isinstance(value, dict):
                print(f"    {name:<26} entries {before['entries'] if before else '-':>6} -> {value['entries']:>6}, "
                      f"bytes {before['bytes'] if before else '-':>9} -> {value['bytes']:>9} "
                      f"(bound {value['max_bytes']})")
            else:
                print(f"    {name:<26} {before} -> {value}")
        for key in ("top_growth", "objects_growth"):
            if key in b:
                print(f"    {key}: {json.dumps(b[key], indent=None)[:2000]}")

    verdict = "FLAT" if worst <= args.max_growth_mib else "GROWING"
    print(f"\nverdict: {verdict} (largest worker growth after warm-up {worst:+.1f} MiB; threshold "
          f"{args.max_growth_mib:g} MiB)")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "samples": samples, "workers": results,
                                              "by_kind": {k: dict(v) for k, v in load.by_kind.items()},
                                              "diagnostics": diag}, indent=1, default=str))
        print(f"results: {args.out}")
    return 0 if verdict == "FLAT" else 2


if __name__ == "__main__":
    sys.exit(main())
