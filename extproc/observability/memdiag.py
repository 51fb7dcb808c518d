"""Memory diagnostics of a worker, for soak runs (``benchmarks/bench_soak_memory.py``); off by default.

With ``$EXTPROC_MEMDIAG_DIR`` set, every worker of ``extproc serve`` appends one JSON line every
``$EXTPROC_MEMDIAG_SECONDS`` (5) to ``<dir>/worker-<pid>.jsonl``: its RSS, the Python objects it
holds (``sys.getallocatedblocks()``) and the C heap's use (glibc ``mallinfo2``: handed out vs held
free), requests finished, streams in flight, asyncio tasks, and the size of everything the gateway keeps between requests
(each memory store's entries and bytes against its bound, coalescing flights, queued usage
records, the embedding cache, cached metric children). Nothing of it is on the request path.

To find what grows:

* ``$EXTPROC_MEMDIAG_TRACEMALLOC=N`` starts :mod:`tracemalloc` (``N`` frames) in the worker; the
  first sample after ``$EXTPROC_MEMDIAG_BASELINE_SECONDS`` (30) takes a baseline snapshot, and every
  later line carries the ten source lines whose live allocations grew most since then. It slows a
  worker down several times: use it to find a leak, not to measure.
* ``$EXTPROC_MEMDIAG_OBJECTS=1`` also counts live objects by type (``gc``), objgraph style, and
  reports the types whose count grew most since the baseline.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from extproc import environment
log = logging.getLogger(__name__)

DIR_ENV = environment.MEMDIAG_DIR
SECONDS_ENV = environment.MEMDIAG_SECONDS
TRACEMALLOC_ENV = environment.MEMDIAG_TRACEMALLOC
BASELINE_ENV = environment.MEMDIAG_BASELINE_SECONDS
OBJECTS_ENV = environment.MEMDIAG_OBJECTS


def rss_kib(pid: int | str = "self") -> int | None:
    """Resident set size (``VmRSS``) of a process in KiB, from ``/proc``; None when gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def malloc_info() -> dict[str, int] | None:
    """glibc's ``mallinfo2()``: bytes the C heap has handed out (``in_use``), holds free
    (``free``: fragmentation or not yet returned) and maps directly (``mmap``); None elsewhere."""
    import ctypes
    import ctypes.util

    global _mallinfo2
    if _mallinfo2 is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = libc.mallinfo2
        except (OSError, AttributeError):
            _mallinfo2 = False
            return None

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]

        fn.restype = MallInfo2
        _mallinfo2 = fn
    if _mallinfo2 is False:
        return None
    info = _mallinfo2()
    return {"in_use": info.uordblks, "free": info.fordblks, "mmap": info.hblkhd}


_mallinfo2: Any = None


def holdings(gateway) -> dict[str, Any]:
    """What the gateway keeps between requests, with each bound (for soak runs and tests)."""
    from extproc.state.memory import MemoryStore

    out: dict[str, Any] = {}

    def store(name: str, s) -> None:
        if isinstance(s, MemoryStore):
            out[name] = {"entries": len(s._data), "bytes": s.used_bytes, "max_bytes": s.max_bytes,
                         "records": len(s._records),
                         "streams": sum(len(d) for d in s._streams.values())}

    store("gateway.store", gateway.store)
    for plugin in gateway.hooks.plugins:
        obj = plugin.obj
        for attr in ("store", "near"):
            s = getattr(obj, attr, None)
            if s is not None and s is not gateway.store:
                store(f"{plugin.name}.{attr}", s)
        reservations = getattr(getattr(obj, "ledger", None), "reservations", None)
        if hasattr(reservations, "holdings"):  # budget counters beside a memory store
            out[f"{plugin.name}.reservations"] = reservations.holdings()
        if hasattr(obj, "in_flight"):
            out[f"{plugin.name}.in_flight"] = obj.in_flight
        pending = getattr(obj, "pending", None)
        if pending is not None and hasattr(pending, "__len__"):
            out[f"{plugin.name}.pending"] = len(pending)
    from extproc.embeddings import prompt as prompts

    if prompts._shared is not None:
        out["embedding_cache"] = len(prompts._shared.cache)
    from extproc.observability.metrics import get_metrics

    out["metric_children"] = len(get_metrics()._children)
    out["plugin_failures"] = sum(gateway.hooks.failures.values())
    return out


def requests_finished() -> int:
    """Requests this process's ``metrics`` plugin counted (``extproc_requests_total``, all labels)."""
    from extproc.observability.metrics import get_metrics

    total = 0.0
    for family in get_metrics().requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return int(total)


class MemDiag:
    """Writes a worker's memory facts to a JSON Lines file every ``interval`` seconds."""

    def __init__(self, worker, directory: str, *, interval: float = 5.0, trace_frames: int = 0,
                 baseline_after: float = 30.0, count_objects: bool = False):
        self.worker = worker
        self.path = Path(directory) / f"worker-{os.getpid()}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.interval = interval
        self.trace_frames = trace_frames
        self.baseline_after = baseline_after
        self.count_objects = count_objects
        self.started = time.monotonic()
        self._baseline = None
        self._baseline_types: Counter | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> "MemDiag":
        if self.trace_frames:
            import tracemalloc

            tracemalloc.start(self.trace_frames)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - diagnostics never fail a worker
                pass

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                line = self.sample()
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(line, separators=(",", ":")) + "\n")
            except Exception:  # noqa: BLE001
                log.exception("memory diagnostics failed")

    def sample(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        line: dict[str, Any] = {
            "t": round(elapsed, 1), "pid": os.getpid(), "rss_kib": rss_kib(),
            "requests": requests_finished(), "active_streams": self.worker.processor.active_streams,
            "streams": getattr(self.worker.processor, "streams", None),
            "streams_cancelled": getattr(self.worker.processor, "streams_cancelled", None),
            "tasks": len(asyncio.all_tasks()), "gc_counts": gc.get_count(),
            "py_blocks": sys.getallocatedblocks(), "malloc": malloc_info(),
            "holdings": holdings(self.worker.gateway),
        }
        take_baseline = self._baseline is None and elapsed >= self.baseline_after
        if self.trace_frames:
            import tracemalloc

            line["traced_kib"] = tracemalloc.get_traced_memory()[0] // 1024
            if take_baseline or self._baseline is not None:
                gc.collect()
                snap = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(False, tracemalloc.__file__)])
                if take_baseline:
                    self._baseline = snap
                else:
                    line["top_growth"] = [
                        {"where": str(s.traceback[0]), "kib": round(s.size_diff / 1024, 1), "count": s.count_diff}
                        for s in snap.compare_to(self._baseline, "lineno")[:10]]
        if self.count_objects:
            types = Counter(type(o).__name__ for o in gc.get_objects())
            line["objects"] = sum(types.values())
            if self._baseline_types is None and elapsed >= self.baseline_after:
                self._baseline_types = types
            elif self._baseline_types is not None:
                grown = Counter(types)
                grown.subtract(self._baseline_types)
                line["objects_growth"] = dict(grown.most_common(10))
        if take_baseline and self._baseline is None:
            self._baseline = True  # no tracemalloc: remember that the baseline moment passed
        return line


def start_from_env(worker) -> MemDiag | None:
    """Start diagnostics in this worker when ``$EXTPROC_MEMDIAG_DIR`` is set."""
    s = environment.memdiag_settings()
    if s is None:
        return None
    diag = MemDiag(worker, s.directory, interval=s.interval, trace_frames=s.trace_frames,
                   baseline_after=s.baseline_after, count_objects=s.count_objects)
    log.warning("worker %d: memory diagnostics to %s", os.getpid(), diag.path)
    return diag.start()
