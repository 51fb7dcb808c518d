#!/usr/bin/env python3
"""What a cache miss costs through the gateway, and how the gateway holds up under load.

    python benchmarks/bench_miss_latency.py [--duration 5] [--cases direct,auto,rate]
        [--tiers small,large] [--connections 1,16,64] [--rates 200,500] [--out miss.json]

Starts the real stack on free loopback ports: Triton with the CPU reference models, the ext_proc
service (``--workers`` 2, the shipped plugin chain of ``extproc/framework/default_config.yaml``
with memory state, the usage file under the run's own folder), Envoy (``envoy/envoy.yaml``), and a
second Envoy without the filter (``envoy/envoy-nofilter.yaml``, its ``tier_passthrough`` cluster
pointed at Triton) so that the cost of Envoy alone is one of the rows. Then, per case:

``direct``  gateway against Triton direct, one connection, for a 1-token answer (non-streamed:
            latency p50/p99) and a streamed answer (``--stream-tokens``, default 8: time to first
            token p50/p99 and the whole answer's p50), per tier of ``--tiers``. Every gateway request
            is a miss (a prompt never sent before, temperature 0: the exact cache looks it up and
            stores it). The direct rows send Triton exactly what the gateway sends it (the same
            rendered prompt, ``generate_stream``), once through the Envoy without the filter and once
            straight to Triton; non-streamed, also Triton's unary ``generate``.
``auto``    ``model: auto`` against pinned ``small`` at each of ``--connections``, closed loop (every
            connection sends its next request when the answer is in): exact-cache hits (one
            repeated request) and misses (every prompt new, 1 token); req/s, p50, p99.
``rate``    open loop at each of ``--rates`` req/s for ``--duration`` s: requests are sent on a fixed
            schedule, whatever the answers do, each on a free connection (a new one when all are
            busy); latency is counted from the scheduled time (no coordinated omission). Pinned
            ``small`` misses, 1 token. Prints p50/p99, how many were sent more than 1 ms late, and
            how many failed.

The client is this process (asyncio, raw HTTP/1.1 keep-alive), on the same two cores as the stack:
its own cost is in every row, gateway and direct alike. ``--quick`` is a short version (2 s per
measurement, small only). Every process started here is stopped at the end. Nothing in the test
suite runs this.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc.commands.stack import ManagedProcess, Stack, StackPorts, http_ok  # noqa: E402
from extproc.commands.tritonserver import free_port  # noqa: E402

TIER_MODELS = {"small": "llm-small", "medium": "llm-medium", "large": "llm-large"}
CHAT_PATH = "/v1/chat/completions"
#: Sent more than this after its scheduled time, an open-loop request counts as late.
LATE_AFTER_S = 0.001
#: Envoy's timepoints the phase case logs, each from the request's first byte (DS_RX_BEG):
#: request received, upstream request sent (begin, end), upstream response (first, last byte),
#: response to the client (first, last byte).
TIMEPOINTS = ("DS_RX_END", "US_TX_BEG", "US_TX_END", "US_RX_BEG", "US_RX_END", "DS_TX_BEG", "DS_TX_END")


# --------------------------------------------------------------------------- the stack


def write_config(work: Path, workers: int) -> Path:
    """The shipped configuration (all its plugins), memory state, the usage file under ``work``."""
    import yaml

    from extproc.framework.config import default_config_text

    cfg = yaml.safe_load(default_config_text())
    cfg["server"]["workers"] = workers
    cfg["server"]["grace_seconds"] = 2
    for plugin in cfg["plugins"]:
        if plugin["name"] == "usage_records":
            plugin.setdefault("settings", {})["path"] = str(work / "usage.jsonl")
    path = work / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class BenchStack:
    """The gateway stack (:class:`~extproc.commands.stack.Stack`) plus an Envoy without ext_proc."""

    def __init__(self, work: Path, models: tuple[str, ...], workers: int):
        self.work = work
        self.stack = Stack(work, ports=StackPorts(0, 0, 0, 0, 0, 0, 0), config_path=write_config(work, workers),
                           models=models, workers=workers)
        self.plain: ManagedProcess | None = None
        self.traced: ManagedProcess | None = None
        self.plain_port = 0

    def start(self) -> "BenchStack":
        from extproc.commands.envoy_config import write_envoy_config

        self.stack.start()
        p = self.stack.ports
        self.plain_port, admin = free_port(), free_port()
        config = write_envoy_config(ROOT / "envoy" / "envoy-nofilter.yaml", self.work / "envoy-nofilter.yaml",
                                    listen_port=self.plain_port, admin_port=admin, extproc_port=p.extproc,
                                    triton_port=p.triton_http, passthrough_port=p.triton_http)
        self.plain = self._extra_envoy("envoy (no ext_proc)", config, "envoy-nofilter.log", admin)
        return self

    def _extra_envoy(self, name: str, config: Path, log: str, admin: int) -> ManagedProcess:
        """Another Envoy beside the stack's, started from ``config`` and ready on its admin port."""
        from extproc.commands.envoy_config import envoy_binary

        envoy = ManagedProcess(name, [envoy_binary(), "-c", str(config), "--use-dynamic-base-id",
                                      "--log-level", "warn", "--concurrency", "2"], self.work / "logs" / log)
        envoy.start()
        envoy.wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "ready")
        return envoy

    @property
    def gateway_port(self) -> int:
        return self.stack.ports.listen

    @property
    def triton_port(self) -> int:
        return self.stack.ports.triton_http

    def start_traced(self) -> int:
        """A second Envoy in front of the same service, its access log (a JSON line per request in
        ``work/phases.log``) holding the ext_proc filter's own per-phase latencies
        (``%FILTER_STATE(envoy.filters.http.ext_proc:TYPED)%``) and Envoy's timepoints from the first
        request byte (``%COMMON_DURATION(DS_RX_BEG:<point>:us)%``); its port."""
        from extproc.commands.envoy_config import dump_config, load_config, render_config_dict

        p = self.stack.ports
        port, admin = free_port(), free_port()
        cfg = render_config_dict(load_config(ROOT / "envoy" / "envoy.yaml"), listen_port=port, admin_port=admin,
                                 extproc_port=p.extproc, triton_port=p.triton_http, passthrough_port=p.triton_http)
        listener = cfg["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        fmt = {"ext_proc": "%FILTER_STATE(envoy.filters.http.ext_proc:TYPED)%", "status": "%RESPONSE_CODE%",
               "cluster": "%UPSTREAM_CLUSTER%", "content_type": "%RESP(CONTENT-TYPE)%"}
        fmt.update({point: f"%COMMON_DURATION(DS_RX_BEG:{point}:us)%" for point in TIMEPOINTS})
        hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(self.phase_log), "log_format": {"json_format": fmt}}}]
        path = self.work / "envoy-phases.yaml"
        path.write_text(dump_config(cfg))
        self.traced = self._extra_envoy("envoy (phase log)", path, "envoy-phases.log", admin)
        return port

    @property
    def phase_log(self) -> Path:
        return self.work / "phases.log"

    @property
    def usage_log(self) -> Path:
        return self.work / "usage.jsonl"

    def stop(self) -> None:
        for proc in (self.traced, self.plain):
            if proc is not None:
                proc.stop()
        self.stack.stop()


# --------------------------------------------------------------------------- the client


@dataclass(slots=True)
class Answer:
    status: int
    total: float  #: seconds from the request (or its scheduled time) to the last byte
    ttft: float  #: seconds to the first ``data:`` bytes of the body (nan when there are none)
    body: bytes


class Conn:
    """One HTTP/1.1 keep-alive connection; one request at a time."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> "Conn":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def send(self, raw: bytes, t0: float | None = None) -> Answer:
        """Send one whole request (``raw``) and read its answer; times count from ``t0`` (default: now)."""
        if self.writer is None:
            await self.open()
        reader = self.reader
        t0 = time.perf_counter() if t0 is None else t0
        self.writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        ttft = float("nan")
        if b"transfer-encoding: chunked" in lower:
            parts = []
            while True:
                line = await reader.readuntil(b"\r\n")
                size = int(line.split(b";", 1)[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                data = await reader.readexactly(size + 2)
                if ttft != ttft and b"data:" in data:
                    ttft = time.perf_counter() - t0
                parts.append(data[:-2])
            body = b"".join(parts)
        else:
            at = lower.find(b"content-length:")
            length = int(lower[at + 15:lower.index(b"\r\n", at)]) if at >= 0 else 0
            body = await reader.readexactly(length) if length else b""
        total = time.perf_counter() - t0
        if b"connection: close" in lower:
            self.close()
        return Answer(status, total, ttft, body)


def post(path: str, body: dict | bytes, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 POST of JSON ``body``."""
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


_run = itertools.count()
RUN_TAG = f"{os.getpid()}-{int(time.time())}"


def fresh_prompt(label: str) -> str:
    """A prompt no request has sent before (every gateway request a cache miss)."""
    return f"Say one word about {label} number {next(_run)} of run {RUN_TAG}."


def chat(model: str, prompt: str, *, max_tokens: int, stream: bool) -> dict:
    return {"model": model, "temperature": 0, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": prompt}]}


def triton_body(tier: str, prompt: str, *, max_tokens: int, stream: bool = True) -> bytes:
    """Exactly what the gateway sends Triton for :func:`chat` (the tier's template applied)."""
    from extproc.formats import openai as oai
    from extproc.formats import triton as triton_format
    from extproc.formats.chat_templates import render
    from extproc.framework.config import load_config

    tier_cfg = load_config(None).tiers[tier]
    req = oai.parse_request("chat", json.dumps(chat(tier, prompt, max_tokens=max_tokens, stream=False)).encode())
    return triton_format.generate_body(req, render(tier_cfg.chat_template, req.messages),
                                       default_max_tokens=tier_cfg.default_max_tokens, stream=stream)


# --------------------------------------------------------------------------- statistics


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` in ms (nearest rank); nan when empty."""
    vals = sorted(v for v in values if v == v)
    if not vals:
        return float("nan")
    return vals[min(len(vals) - 1, max(0, int(round(q * len(vals) + 0.5)) - 1))] * 1e3


@dataclass
class Sample:
    """What one measurement collected."""

    name: str
    totals: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    late: int = 0
    wall: float = 0.0
    note: str = ""

    def add(self, a: Answer) -> None:
        if a.status != 200:
            self.errors += 1
            return
        self.totals.append(a.total)
        self.ttfts.append(a.ttft)

    @property
    def rps(self) -> float:
        return len(self.totals) / self.wall if self.wall else 0.0

    def summary(self) -> dict:
        return {"name": self.name, "n": len(self.totals), "errors": self.errors, "late": self.late,
                "rps": round(self.rps, 1), "p50_ms": pct(self.totals, .5), "p99_ms": pct(self.totals, .99),
                "ttft_p50_ms": pct(self.ttfts, .5), "ttft_p99_ms": pct(self.ttfts, .99), "note": self.note}


# --------------------------------------------------------------------------- measurements


async def closed_loop(name: str, port: int, make, connections: int, duration: float,
                      warmup: float = 0.5) -> Sample:
    """``connections`` connections, each sending ``make()``'s next request when the last is answered."""
    sample = Sample(name)
    conns = [await Conn(port).open() for _ in range(connections)]
    measuring = False
    stop_at = time.perf_counter() + warmup + duration

    async def client(conn: Conn) -> None:
        while time.perf_counter() < stop_at:
            try:
                a = await conn.send(make())
            except (OSError, asyncio.IncompleteReadError, ValueError):
                sample.errors += measuring
                conn.close()
                continue
            if measuring:
                sample.add(a)

    tasks = [asyncio.ensure_future(client(c)) for c in conns]
    await asyncio.sleep(warmup)
    measuring, t0 = True, time.perf_counter()
    await asyncio.gather(*tasks)
    sample.wall = time.perf_counter() - t0
    for c in conns:
        c.close()
    return sample


async def interleaved(port_of: dict[str, int], makers: dict[str, object], rounds: int, per_round: int,
                      gap: float = 0.0, budget: float | None = None) -> dict[str, Sample]:
    """One connection per case; the cases take turns (``per_round`` requests each, ``rounds`` times,
    at least two rounds but no new round once ``budget`` seconds are spent), so that drift on the
    machine hits all of them alike."""
    samples = {name: Sample(name) for name in makers}
    conns = {name: await Conn(port_of[name]).open() for name in makers}
    for name, make in makers.items():  # warm-up: the connection, the route, the model
        for _ in range(5):
            await conns[name].send(make())
    started = time.perf_counter()
    for r in range(rounds):
        if budget is not None and r >= 2 and time.perf_counter() - started > budget:
            break
        order = list(makers) if r % 2 == 0 else list(reversed(makers))
        for name in order:
            t0 = time.perf_counter()
            for _ in range(per_round):
                samples[name].add(await conns[name].send(makers[name]()))
                if gap:
                    await asyncio.sleep(gap)
            samples[name].wall += time.perf_counter() - t0
    for c in conns.values():
        c.close()
    return samples


async def open_loop(name: str, port: int, make, rate: float, duration: float, max_connections: int = 512) -> Sample:
    """Requests at a fixed rate for ``duration`` s, whatever the answers do (latency from the schedule)."""
    sample = Sample(name)
    idle: list[Conn] = [await Conn(port).open() for _ in range(8)]
    opened = len(idle)
    pending: set[asyncio.Task] = set()
    n = int(rate * duration)
    t0 = time.perf_counter() + 0.05

    async def one(due: float) -> None:
        nonlocal opened
        conn = idle.pop() if idle else None
        if conn is None:
            if opened >= max_connections:
                sample.errors += 1
                return
            opened += 1
            conn = Conn(port)
        if time.perf_counter() - due > LATE_AFTER_S:
            sample.late += 1
        try:
            sample.add(await conn.send(make(), t0=due))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            sample.errors += 1
            conn.close()
            return
        if conn.writer is not None:
            idle.append(conn)

    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=30)
    sample.wall = duration
    sample.note = f"{opened} connections used"
    for c in idle:
        c.close()
    return sample


def repeated_body(model: str, tag: str) -> bytes:
    """The one request ``benchmarks/wrk/fresh.lua`` repeats with ``BENCH_REPEAT=1`` (byte for byte)."""
    return ('{"model":"%s","temperature":0,"max_tokens":1,"messages":[{"role":"user","content":'
            '"Say hello in five words (%s)."}]}' % (model, tag)).encode()


def wrk_run(port: int, model: str, connections: int, duration: float, *, tag: str, repeat: bool) -> dict | None:
    """wrk (``benchmarks/wrk/fresh.lua``) at ``connections`` connections, closed loop: a new prompt
    every request (misses) or the one :func:`repeated_body` (hits); None when wrk is not installed."""
    import shutil
    import subprocess

    if shutil.which("wrk") is None:
        return None
    env = {**os.environ, "BENCH_MODEL": model, "BENCH_MAX_TOKENS": "1", "BENCH_TAG": tag,
           "BENCH_REPEAT": "1" if repeat else "0"}
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
                          "-s", str(ROOT / "benchmarks" / "wrk" / "fresh.lua"), f"http://127.0.0.1:{port}"],
                         capture_output=True, text=True, env=env, timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    w = json.loads(line[len("WRK_JSON "):])
    secs = w["duration_us"] / 1e6
    return {"client": "wrk", "n": w["requests"], "non2xx": w["errors_status"],
            "errors": sum(w[k] for k in ("errors_connect", "errors_read", "errors_write", "errors_timeout")),
            "rps": round(w["requests"] / secs, 1) if secs else 0.0, "p50_ms": w["p50_us"] / 1e3,
            "p99_ms": w["p99_us"] / 1e3}


def closed_run(port: int, model: str, connections: int, duration: float, *, tag: str, repeat: bool) -> dict:
    """:func:`wrk_run`, or this process's client (:func:`closed_loop`) when wrk is not installed."""
    result = wrk_run(port, model, connections, duration, tag=tag, repeat=repeat)
    if result is not None:
        return result
    if repeat:
        raw = post(CHAT_PATH, repeated_body(model, tag))
        make = lambda: raw  # noqa: E731
    else:
        make = lambda: post(CHAT_PATH, chat(model, fresh_prompt(tag), max_tokens=1, stream=False))  # noqa: E731
    s = asyncio.run(closed_loop("python", port, make, connections, duration)).summary()
    return {"client": "python", "n": s["n"], "non2xx": s["errors"], "errors": 0, "rps": s["rps"],
            "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"]}


async def warm(port: int, raw: bytes, n: int = 20) -> list[int]:
    """Send ``raw`` ``n`` times on one connection (a repeated request becomes a hit on every
    worker); the statuses."""
    conn = await Conn(port).open()
    statuses = [(await conn.send(raw)).status for _ in range(n)]
    conn.close()
    return statuses


# --------------------------------------------------------------------------- the cases


def case_direct(stack: BenchStack, tiers: list[str], duration: float, stream_tokens: int) -> list[dict]:
    """Gateway against Triton direct (and Envoy alone), one connection, interleaved."""
    rows = []
    for tier in tiers:
        model = TIER_MODELS[tier]
        gen, stream_path = f"/v2/models/{model}/generate", f"/v2/models/{model}/generate_stream"

        def triton(path: str, tokens: int, stream: bool = True):
            return lambda: post(path, triton_body(tier, fresh_prompt(tier), max_tokens=tokens, stream=stream))

        def gateway(tokens: int, stream: bool):
            return lambda: post(CHAT_PATH, chat(tier, fresh_prompt(tier), max_tokens=tokens, stream=stream))

        makers = {
            "Triton generate (unary)": (stack.triton_port, triton(gen, 1, stream=False)),
            "Triton generate_stream": (stack.triton_port, triton(stream_path, 1)),
            "Envoy alone -> generate_stream": (stack.plain_port, triton(stream_path, 1)),
            "gateway, chat JSON": (stack.gateway_port, gateway(1, False)),
            f"Triton generate_stream, {stream_tokens} tok": (stack.triton_port, triton(stream_path, stream_tokens)),
            f"Envoy alone, {stream_tokens} tok": (stack.plain_port, triton(stream_path, stream_tokens)),
            f"gateway, chat SSE, {stream_tokens} tok": (stack.gateway_port, gateway(stream_tokens, True)),
        }
        # Rounds of 20 per path until about `duration` s per path are spent (at most 1,000 per path).
        samples = asyncio.run(interleaved({k: p for k, (p, _) in makers.items()},
                                          {k: m for k, (_, m) in makers.items()}, 50, 20,
                                          budget=duration * len(makers)))
        for name, s in samples.items():
            rows.append({"tier": tier, **s.summary(), "name": name})
    return rows


def case_phases(stack: BenchStack, tiers: list[str], requests: int, stream_tokens: int) -> list[dict]:
    """Where a miss's time goes: Envoy's per-phase view (the phase-logging Envoy) and the service's
    own Python time per phase (its usage records' ``timings_ms``), one connection."""
    import time as _time

    port = stack.start_traced()
    _time.sleep(2.5)  # the earlier cases' usage records are written (the service flushes about every second)
    first_record = _lines(stack.usage_log)
    runs = []
    for tier in tiers:
        for label, tokens, stream in (("chat JSON, 1 tok", 1, False), (f"chat SSE, {stream_tokens} tok", stream_tokens, True)):
            make = lambda: post(CHAT_PATH, chat(tier, fresh_prompt("phases"), max_tokens=tokens, stream=stream))  # noqa: E731
            asyncio.run(interleaved({"m": port}, {"m": make}, 1, requests))
            runs.append((tier, label, stream))
    _time.sleep(2.5)  # Envoy flushes its access log, the service its usage records, about every second
    envoy, service = _read_json_lines(stack.phase_log), _read_json_lines(stack.usage_log)[first_record:]
    rows = []
    for tier, label, stream in runs:
        kind = "text/event-stream" if stream else "application/json"
        mine = [r for r in envoy if str(r.get("status")) == "200" and str(r.get("cluster")).startswith(f"tier_{tier}")
                and str(r.get("content_type", "")).startswith(kind)]
        theirs = [r for r in service if r.get("tier") == tier and r.get("stream") is stream
                  and r.get("cache_status") == "miss"]
        client = {"p50_ms": pct([r["DS_TX_END"] / 1e6 for r in mine if isinstance(r.get("DS_TX_END"), int)], .5)}
        rows.append({"tier": tier, "case": label, **client, **phase_figures(mine, theirs)})
    return rows


def _lines(path: Path) -> int:
    return sum(1 for _ in open(path)) if path.exists() else 0


def _read_json_lines(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _med(values) -> float:
    vals = [float(v) for v in values if isinstance(v, (int, float)) or (isinstance(v, str) and v.isdigit())]
    return statistics.median(vals) if vals else float("nan")


def phase_figures(envoy: list[dict], service: list[dict]) -> dict:
    """Medians (ms): Envoy's ext_proc round trip per phase, Envoy's timepoints, the service's Python per phase."""
    xp = [r["ext_proc"] for r in envoy if isinstance(r.get("ext_proc"), dict)]
    f = {"envoy_n": len(envoy), "service_n": len(service)}
    for key in ("request_header_latency_us", "request_body_total_latency_us", "response_header_latency_us",
                "response_body_total_latency_us", "response_body_max_latency_us", "response_body_call_count"):
        f[key] = _med(x.get(key) for x in xp)
    for point in TIMEPOINTS:
        f[point] = _med(r.get(point) for r in envoy)
    f["response_body_call_count"] = _med(x.get("response_body_call_count") for x in xp)
    for key in ("phase:request_headers", "phase:request_body", "phase:response_headers", "phase:response_body"):
        f[key] = _med(r["timings_ms"].get(key) for r in service if "timings_ms" in r)
    return f


def case_auto(stack: BenchStack, connections: list[int], duration: float) -> list[dict]:
    """``auto`` against pinned ``small``: exact hits and misses (1 token) at each number of connections."""
    rows = []
    port = stack.gateway_port
    for kind in ("hit", "miss"):
        for conns in connections:
            for model in ("small", "auto"):
                tag = f"{RUN_TAG}-{kind}-{conns}-{model}"
                if kind == "hit":  # stored (and, for auto, routed) before the measurement
                    asyncio.run(warm(port, post(CHAT_PATH, repeated_body(model, tag))))
                result = closed_run(port, model, conns, duration, tag=tag, repeat=kind == "hit")
                rows.append({"kind": kind, "connections": conns, "model": model, **result})
    return rows


def case_rate(stack: BenchStack, rates: list[float], duration: float) -> list[dict]:
    """Open loop: pinned ``small`` misses (1 token) at each fixed rate."""
    rows = []
    for rate in rates:
        make = lambda: post(CHAT_PATH, chat("small", fresh_prompt("rate"), max_tokens=1, stream=False))  # noqa: E731
        s = asyncio.run(open_loop(f"{rate:g} req/s", stack.gateway_port, make, rate, duration))
        rows.append({"rate": rate, "sent": int(rate * duration), **s.summary()})
    return rows


# --------------------------------------------------------------------------- output


def _f(v: float, width: int = 8, digits: int = 2) -> str:
    return f"{v:>{width}.{digits}f}" if v == v else f"{'-':>{width}}"


def print_report(results: dict) -> None:
    print(f"\nload average before {results['load_before']:.2f}, after {results['load_after']:.2f} "
          f"({os.cpu_count()} CPUs, shared with whatever else runs); service: {results['workers']} workers, "
          f"the shipped plugin chain, memory state")
    if "direct" in results:
        print("\n1. misses against Triton direct, 1 connection, interleaved rounds (ms)")
        print(f"{'tier':<6} {'path':<40} {'n':>5} {'err':>4} {'p50':>8} {'p99':>8} {'TTFT p50':>9} {'TTFT p99':>9}")
        for r in results["direct"]:
            print(f"{r['tier']:<6} {r['name']:<40} {r['n']:>5} {r['errors']:>4} {_f(r['p50_ms'])} {_f(r['p99_ms'])} "
                  f"{_f(r['ttft_p50_ms'], 9)} {_f(r['ttft_p99_ms'], 9)}")
        for tier, added in results.get("added", {}).items():
            print(f"{tier}: added by the gateway at p50: non-streamed {added['json_ms']:+.2f} ms over Triton's "
                  f"unary generate ({added['json_vs_stream_ms']:+.2f} over generate_stream, what the gateway calls); "
                  f"TTFT {added['ttft_ms']:+.2f} ms; Envoy alone {added['envoy_json_ms']:+.2f} / TTFT "
                  f"{added['envoy_ttft_ms']:+.2f} ms")
    if "phases" in results:
        print("\n1b. where a miss's time goes, one connection, medians in ms: Envoy's ext_proc round trip per "
              "phase (its filter state), the service's own Python per phase (its usage records), Envoy's "
              "timepoints from the request's first byte")
        for r in results["phases"]:
            us = lambda k: r[k] / 1e3  # noqa: E731
            print(f"{r['tier']} {r['case']}: Envoy's request duration p50 {_f(r['p50_ms'], 0, 3)} "
                  f"({r['envoy_n']} requests in Envoy's log, {r['service_n']} usage records)")
            print(f"   round trip to the service : request headers {_f(us('request_header_latency_us'), 0, 3)}, "
                  f"request body {_f(us('request_body_total_latency_us'), 0, 3)}, response headers "
                  f"{_f(us('response_header_latency_us'), 0, 3)}, response body {_f(us('response_body_total_latency_us'), 0, 3)} "
                  f"in {r['response_body_call_count']:.0f} message(s) (slowest {_f(us('response_body_max_latency_us'), 0, 3)})")
            print(f"   the service's Python      : request headers {_f(r['phase:request_headers'], 0, 3)}, request body "
                  f"{_f(r['phase:request_body'], 0, 3)}, response headers {_f(r['phase:response_headers'], 0, 3)}, "
                  f"response body {_f(r['phase:response_body'], 0, 3)} (all chunks)")
            print("   Envoy's timepoints        : " + ", ".join(f"{p} {_f(us(p), 0, 3)}" for p in TIMEPOINTS))
            upstream = (r["US_RX_BEG"] - r["US_TX_END"]) / 1e3
            print(f"   upstream (request sent -> first byte back) {_f(upstream, 0, 3)}; first byte back -> first byte "
                  f"to the client {_f((r['DS_TX_BEG'] - r['US_RX_BEG']) / 1e3, 0, 3)}")
    if "auto" in results:
        print("\n2. auto against pinned small, closed loop (exact hits: one repeated request; misses: new prompts, 1 token)")
        print(f"{'kind':<5} {'conns':>5} {'model':<6} {'client':<7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'errors':>7}")
        for r in results["auto"]:
            print(f"{r['kind']:<5} {r['connections']:>5} {r['model']:<6} {r['client']:<7} {r['rps']:>8.0f} "
                  f"{_f(r['p50_ms'])} {_f(r['p99_ms'])} {r['non2xx']:>8} {r['errors']:>7}")
    if "rate" in results:
        print(f"\n3. fixed rate (open loop), pinned small misses, 1 token; latency from the scheduled send "
              f"time; late: sent more than {LATE_AFTER_S * 1e3:g} ms after it")
        print(f"{'rate':>6} {'sent':>6} {'ok':>6} {'failed':>7} {'late':>6} {'p50 ms':>8} {'p99 ms':>8}  note")
        for r in results["rate"]:
            print(f"{r['rate']:>6g} {r['sent']:>6} {r['n']:>6} {r['errors']:>7} {r['late']:>6} {_f(r['p50_ms'])} "
                  f"{_f(r['p99_ms'])}  {r['note']}")


def added_figures(rows: list[dict], stream_tokens: int) -> dict:
    """Per tier: what the gateway (and Envoy alone) add at p50, non-streamed and to the TTFT."""
    out = {}
    for tier in dict.fromkeys(r["tier"] for r in rows):
        by = {r["name"]: r for r in rows if r["tier"] == tier}
        ttft_direct = by[f"Triton generate_stream, {stream_tokens} tok"]["ttft_p50_ms"]
        out[tier] = {
            "json_ms": by["gateway, chat JSON"]["p50_ms"] - by["Triton generate (unary)"]["p50_ms"],
            "json_vs_stream_ms": by["gateway, chat JSON"]["p50_ms"] - by["Triton generate_stream"]["p50_ms"],
            "ttft_ms": by[f"gateway, chat SSE, {stream_tokens} tok"]["ttft_p50_ms"] - ttft_direct,
            "envoy_json_ms": by["Envoy alone -> generate_stream"]["p50_ms"] - by["Triton generate_stream"]["p50_ms"],
            "envoy_ttft_ms": by[f"Envoy alone, {stream_tokens} tok"]["ttft_p50_ms"] - ttft_direct,
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="direct,phases,auto,rate", help="comma-separated: direct, phases, auto, rate")
    ap.add_argument("--phase-requests", type=int, default=300, help="requests per row of the phases case")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (direct: per path)")
    ap.add_argument("--tiers", default="small,large", help="tiers of the direct case")
    ap.add_argument("--connections", default="1,16,64", help="connections of the auto case")
    ap.add_argument("--rates", default="200,500", help="req/s of the rate case")
    ap.add_argument("--stream-tokens", type=int, default=8, help="tokens of the streamed answers (direct case)")
    ap.add_argument("--workers", type=int, default=2, help="service worker processes")
    ap.add_argument("--quick", action="store_true", help="a short run: 2 s per measurement, tier small only")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - {"direct", "phases", "auto", "rate"}
    if unknown:
        ap.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    duration = 2.0 if args.quick else args.duration
    tiers = ["small"] if args.quick else [t for t in args.tiers.split(",") if t]
    models = tuple(TIER_MODELS.values())  # all three: `auto` may route to any tier
    work = Path(tempfile.mkdtemp(prefix="bench-miss-"))
    stack = BenchStack(work, models, args.workers)
    results: dict = {"load_before": os.getloadavg()[0], "workers": args.workers, "cases": cases,
                     "duration": duration}
    try:
        t0 = time.monotonic()
        stack.start()
        print(f"stack up in {time.monotonic() - t0:.0f} s: Triton ({', '.join(models)}), the service, Envoy "
              f":{stack.gateway_port}, Envoy without ext_proc :{stack.plain_port}; logs in {work}/logs", flush=True)
        if "direct" in cases:
            results["direct"] = case_direct(stack, tiers, duration, args.stream_tokens)
            results["added"] = added_figures(results["direct"], args.stream_tokens)
            print("direct: done", flush=True)
        if "phases" in cases:
            results["phases"] = case_phases(stack, tiers, args.phase_requests, args.stream_tokens)
            print("phases: done", flush=True)
        if "auto" in cases:
            results["auto"] = case_auto(stack, [int(c) for c in args.connections.split(",") if c], duration)
            print("auto: done", flush=True)
        if "rate" in cases:
            results["rate"] = case_rate(stack, [float(r) for r in args.rates.split(",") if r], duration)
            print("rate: done", flush=True)
    finally:
        stack.stop()
    results["load_after"] = os.getloadavg()[0]
    print_report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
