#!/usr/bin/env python
"""Benchmark the CPU reference LLM tiers behind a real tritonserver (run by hand, not in CI).

For each tier and each number of concurrent streams (default 1, 4, 16, 32) it measures, with
in-flight batching on (``max_active_sequences`` 32) and off (1):

* tokens/s: generated tokens of all streams / wall time of the cell;
* p50 / p99 time to first token (TTFT) of the streamed requests (``/generate_stream``);
* server CPU ms per token: CPU time (user+sys) of tritonserver and its Python stubs during the
  cell, divided by the tokens generated.

Every stream sends ``--requests-per-stream`` streaming requests one after the other (at least
``--min-requests`` requests per cell), each asking for ``--max-tokens`` tokens, so every request
is measured to completion.  Both servers (batching on / off) run side by side and each cell is
run for both modes back to back, so background load on a shared machine hits both alike;
``--repeat N`` runs each cell N times and keeps the fastest.  Also printed: the model-only CPU cost per token (in-process decode
step at batch 1), and the two target ratios (batching speed-up at 16 streams on the large tier;
large vs small CPU per token).

    .venv/bin/python benchmarks/bench_triton_tiers.py            # the full table, a few minutes
    .venv/bin/python benchmarks/bench_triton_tiers.py --tiers llm-small --concurrency 1 4
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import selectors
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "triton_models"))

from extproc.commands.tritonserver import TritonProcess, free_port  # noqa: E402

TIERS = ["llm-small", "llm-medium", "llm-large"]
PROMPTS = [
    "Summarise the history of the printing press in three sentences.",
    "Write a haiku about batching requests on a CPU.",
    "Explain what a KV cache is to a new engineer.",
    "List five reasons to put a gateway in front of an inference server.",
]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _proc_group_cpu(pgid: int) -> float:
    """user+sys CPU seconds of every live process in process group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # fields[0] is state (field 3); pgrp is field 5, utime 14, stime 15
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


@dataclass
class Cell:
    tier: str
    batching: str
    streams: int
    requests: int = 0
    tokens: int = 0
    wall: float = 0.0
    ttft: list[float] = field(default_factory=list)
    cpu: float = 0.0
    errors: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def stream_once(host: str, port: int, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """One streamed request; returns (time to first token, tokens received)."""
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        body = json.dumps({"text_input": prompt, "max_tokens": max_tokens, "stream": True})
        t0 = time.perf_counter()
        conn.request("POST", f"/v2/models/{model}/generate_stream", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        # Lean SSE reading (the client shares the CPU with the server): read whatever arrived,
        # note the first event's arrival, and parse only the last event's JSON.
        ttft = None
        buf = b""
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            if ttft is None and b"data:" in buf + chunk:
                ttft = time.perf_counter() - t0
            buf = (buf + chunk)[-65536:]
            if buf.endswith(b"\n\n"):
                tail = buf[buf.rfind(b"data:", 0, len(buf) - 2):]
                if b'"finish_reason":"s' in tail or b'"finish_reason":"l' in tail or b'"error"' in tail:
                    break
        events = [e for e in buf.split(b"\n\n") if e.strip().startswith(b"data:")]
        if not events:
            raise RuntimeError(f"no SSE event in {buf[-300:]!r}")
        last = json.loads(events[-1].strip()[5:])
        if "error" in last:
            raise RuntimeError(last["error"])
        tokens = int(last.get("completion_tokens", 0))
        return (ttft if ttft is not None else float("nan")), tokens
    finally:
        conn.close()


class _Stream:
    """One client stream of :func:`run_cell`: its current request on a non-blocking socket."""

    __slots__ = ("i", "r", "sock", "t0", "ttft", "data", "body_at")

    def __init__(self, i: int) -> None:
        self.i, self.r = i, 0
        self.sock = None
        self.t0 = self.ttft = 0.0
        self.data = bytearray()
        self.body_at = -1


def _dechunk(body: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        eol = body.index(b"\r\n", at)
        size = int(body[at:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[eol + 2:eol + 2 + size]
        at = eol + 2 + size + 2


def _last_event(head: bytes, body: bytes) -> dict:
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status:
        raise RuntimeError(f"{status!r}: {body[:200]!r}")
    if b"chunked" in head.lower():
        body = _dechunk(body)
    events = [e for e in body.split(b"\n\n") if e.strip().startswith(b"data:")]
    if not events:
        raise RuntimeError(f"no SSE event in {body[-300:]!r}")
    last = json.loads(events[-1].strip()[5:])
    if "error" in last:
        raise RuntimeError(last["error"])
    return last


def run_cell(triton: TritonProcess, tier: str, batching: str, streams: int, per_stream: int,
             min_requests: int, max_tokens: int) -> Cell:
    """``streams`` concurrent streams, each sending ``per_stream`` streamed requests in a row.

    One thread drives all streams over non-blocking sockets (``selectors``): the client shares
    the two cores with the server, and 16-32 Python threads each waking per SSE event cost more
    CPU than the events themselves.  Each request is a new HTTP/1.1 connection; its time to
    first token is when the first ``data:`` bytes arrive, and the response (chunked SSE) is only
    parsed once, at its end, for the last event's ``completion_tokens``.
    """
    cell = Cell(tier, batching, streams)
    per_stream = max(per_stream, -(-min_requests // streams))
    sel = selectors.DefaultSelector()
    path = f"/v2/models/{tier}/generate_stream"

    def start(st: _Stream) -> None:
        body = json.dumps({"text_input": PROMPTS[(st.i + st.r) % len(PROMPTS)] + f" ({st.i}.{st.r})",
                           "max_tokens": max_tokens, "stream": True}).encode()
        req = (f"POST {path} HTTP/1.1\r\nHost: {triton.host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        st.data = bytearray()
        st.body_at, st.ttft = -1, 0.0
        st.t0 = time.perf_counter()
        st.sock = socket.create_connection((triton.host, triton.http_port), timeout=300)
        st.sock.sendall(req)
        st.sock.setblocking(False)
        sel.register(st.sock, selectors.EVENT_READ, st)

    def finish(st: _Stream, error: Exception | None) -> None:
        sel.unregister(st.sock)
        st.sock.close()
        try:
            if error:
                raise error
            last = _last_event(bytes(st.data[:st.body_at]), bytes(st.data[st.body_at + 4:]))
            cell.requests += 1
            cell.tokens += int(last.get("completion_tokens", 0))
            cell.ttft.append(st.ttft or float("nan"))
        except Exception as exc:  # counted, shown in the table
            cell.errors += 1
            print(f"  ! {tier} {batching} c={streams}: {exc}", file=sys.stderr)
        st.r += 1
        if st.r < per_stream:
            start(st)

    all_streams = [_Stream(i) for i in range(streams)]
    cpu0 = _proc_group_cpu(triton.pid)
    t0 = time.perf_counter()
    for st in all_streams:
        start(st)
    while sel.get_map():
        for key, _ in sel.select(timeout=300):
            st = key.data
            try:
                chunk = st.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                finish(st, exc)
                continue
            if not chunk:
                finish(st, None if st.body_at >= 0 else RuntimeError("connection closed early"))
                continue
            st.data += chunk
            if st.body_at < 0:
                st.body_at = st.data.find(b"\r\n\r\n")
            if st.body_at >= 0:
                if not st.ttft and st.data.find(b"data:", st.body_at) >= 0:
                    st.ttft = time.perf_counter() - st.t0
                if st.data.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of the response
                    finish(st, None)
    cell.wall = time.perf_counter() - t0
    cell.cpu = _proc_group_cpu(triton.pid) - cpu0
    sel.close()
    return cell


def served_blas_threads(triton: TritonProcess) -> dict[str, int]:
    """The ``reference_llm_blas_threads`` gauge of each served tier (0: unknown)."""
    import urllib.request

    from extproc.observability.triton_metrics import parse_metrics

    gauge = "reference_llm_blas_threads"
    with urllib.request.urlopen(triton.metrics_url, timeout=10) as r:
        loads, _gpu = parse_metrics(r.read().decode(), extra=[gauge])
    return {model: int(load.extra[gauge]) for model, load in loads.items() if gauge in load.extra}


def model_only_cpu_per_token(tiers: list[str], steps: int = 40, blas_threads: int | None = None) -> dict[str, float]:
    """In-process: CPU ms per token of a batch-1 decode step at a 64-token context, with the
    served tiers' BLAS thread count (``blas_threads``, default their config's: 1)."""
    import numpy as np
    from reference_llm import Engine
    from reference_llm.blas_threads import limit_blas_threads

    limit_blas_threads(blas_threads or 1)

    out = {}
    for tier in tiers:
        m = Engine(tier, max_active_sequences=1).model
        m.prefill(0, np.arange(64, dtype=np.int64) + 1000)
        ids, pos = np.array([1234]), np.array([64])
        m.decode(ids, pos)
        c0 = time.process_time()
        for _ in range(steps):
            m.decode(ids, pos)
        out[tier] = (time.process_time() - c0) / steps * 1e3
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiers", nargs="+", default=TIERS)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 32])
    ap.add_argument("--modes", nargs="+", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=6)
    ap.add_argument("--batch-on-size", type=int, default=32, help="max_active_sequences when batching is on")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="BLAS threads of the model processes (default: their config's blas_threads, 1)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every cell this many times and keep the fastest (noisy shared machines)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for tritonserver (repeatable)")
    args = ap.parse_args(argv)

    blas_env = {}
    if args.blas_threads:
        blas_env = {"EXTPROC_LLM_BLAS_THREADS": str(args.blas_threads)}
    blas_env.update(kv.split("=", 1) for kv in args.env)
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp, contextlib.ExitStack() as stack:
        # One server per mode, all up at once, and the cells of the two modes run back to back:
        # on a shared machine both then see the same background load.
        servers: dict[str, TritonProcess] = {}
        for mode in args.modes:
            active = args.batch_on_size if mode == "on" else 1
            triton = TritonProcess(
                REPO / "triton_models",
                http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                work_dir=Path(tmp) / mode, models=args.tiers,
                env={"EXTPROC_LLM_MAX_ACTIVE_SEQUENCES": str(active), **blas_env},
            )
            stack.enter_context(triton)
            servers[mode] = triton
        for mode, triton in servers.items():
            triton.wait_ready(120)
            print(f"# batching {mode}: max_active_sequences="
                  f"{args.batch_on_size if mode == 'on' else 1}, tritonserver pid {triton.pid}", file=sys.stderr)
            for tier in args.tiers:  # warm-up
                stream_once(triton.host, triton.http_port, tier, "warm up", 4)
            print(f"#   BLAS threads per model process: {served_blas_threads(triton)}", file=sys.stderr)
        for tier in args.tiers:
            for c in args.concurrency:
                for mode, triton in servers.items():
                    runs = [run_cell(triton, tier, mode, c, args.requests_per_stream, args.min_requests,
                                     args.max_tokens) for _ in range(args.repeat)]
                    cell = max(runs, key=lambda x: x.tok_s)
                    cells.append(cell)
                    print(f"#   {tier} {mode} c={c}: " + ", ".join(f"{r.tok_s:.0f}" for r in runs)
                          + f" tok/s (wall {cell.wall:.1f}s)", file=sys.stderr)
    cells.sort(key=lambda x: (args.modes.index(x.batching), args.tiers.index(x.tier), x.streams))

    header = (f"{'tier':<11} {'batching':<8} {'streams':>7} {'reqs':>5} {'tokens':>7} {'wall s':>7} "
              f"{'tok/s':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'srv CPU ms/tok':>15} {'err':>4}")
    print(f"\nmax_tokens={args.max_tokens} per request, streamed via /generate_stream")
    print(header)
    print("-" * len(header))
    for c in cells:
        print(f"{c.tier:<11} {c.batching:<8} {c.streams:>7} {c.requests:>5} {c.tokens:>7} {c.wall:>7.2f} "
              f"{c.tok_s:>8.1f} {_percentile(c.ttft, 0.5) * 1e3:>12.1f} {_percentile(c.ttft, 0.99) * 1e3:>12.1f} "
              f"{(c.cpu / c.tokens * 1e3 if c.tokens else float('nan')):>15.3f} {c.errors:>4}")

    model_cpu = model_only_cpu_per_token(args.tiers, blas_threads=args.blas_threads)
    print("\nmodel-only CPU ms/token (in-process decode step, batch 1, 64-token context):")
    for tier, ms in model_cpu.items():
        print(f"  {tier:<11} {ms:8.3f}")

    def find(tier, mode, c):
        return next((x for x in cells if x.tier == tier and x.batching == mode and x.streams == c), None)

    print()
    on, off = find("llm-large", "on", 16), find("llm-large", "off", 16)
    if on and off and off.tok_s:
        ratio = on.tok_s / off.tok_s
        print(f"large tier, 16 streams: batching on/off tokens/s = {ratio:.2f}x (target >= 4x)")
    if "llm-large" in model_cpu and "llm-small" in model_cpu:
        print(f"large/small model-only CPU per token = {model_cpu['llm-large'] / model_cpu['llm-small']:.1f}x (target >= 8x)")
    sl, ll = find("llm-small", "off", 1), find("llm-large", "off", 1)
    if sl and ll and sl.tokens and ll.tokens:
        r = (ll.cpu / ll.tokens) / (sl.cpu / sl.tokens)
        print(f"large/small server CPU per token (1 stream, batching off, incl. HTTP/IPC overhead) = {r:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
