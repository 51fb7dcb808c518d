"""Usage records: one JSON object per request, what it was and what it cost.

Written by the ``usage_records`` plugin, read by ``extproc report``. A record (schema ``v: 1``)::

    {"v": 1, "ts": 1767000000.123, "request_id": "...", "tenant": "acme", "workflow": "support",
     "api_key_id": null, "tier": "small", "model": "llm-small", "endpoint": "chat", "stream": false,
     "outcome": "completed", "status": 200, "reason": "default",
     "prompt_tokens": 12, "completion_tokens": 16, "tokens_saved": 0, "tokens_cut": 0,
     "cost_usd": 0.0000044, "cost": {"prompt": ..., "completion": ..., "retries": 0.0,
     "embeddings": 0.0, "overhead": 0.0}, "cost_saved_usd": 0.0, "retry": false,
     "cache_status": null, "budget_status": null, "embedding_calls": 0, "degraded": [],
     "latency_ms": {"total": 41.2, "ttft": 40.1, "upstream": 39.0, "gateway": 0.4},
     "timings_ms": {"phase:request_headers": 0.05, "plugin:model_tiers": 0.01, ...}}

``cost_usd`` is the whole cost (``sum(cost.values())``); ``ts`` is the Unix time the request finished.

Sinks: :class:`JsonlFile` (rotating JSON Lines file, safe for several processes appending at once)
and a Redis stream (``Store.stream_add``, capped). Readers: :func:`read_jsonl` and :func:`read_redis`.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    from extproc.framework.context import RequestContext
    from extproc.observability.cost_model import CostBreakdown

SCHEMA_VERSION = 1
DEFAULT_STREAM = "usage"
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def build_record(ctx: "RequestContext", cost: "CostBreakdown", *, retry: bool, gateway_ms: float) -> dict:
    """The usage record of a finished request (a plain dict; encoding happens off the request path)."""
    usage, timings = ctx.usage, ctx.timings_ms
    tier = ctx.tier_config
    return {
        "v": SCHEMA_VERSION,
        "ts": time.time(),
        "request_id": ctx.request_id,
        "tenant": ctx.tenant,
        "workflow": ctx.workflow,
        "api_key_id": ctx.api_key_id,
        "tier": ctx.tier,
        "model": tier.model if tier is not None else None,
        "endpoint": ctx.endpoint,
        "stream": ctx.stream,
        "outcome": ctx.outcome,
        "status": ctx.response_status,
        "reason": ctx.tier_reason or None,
        "prompt_tokens": usage.prompt_tokens if usage is not None else 0,
        "completion_tokens": usage.completion_tokens if usage is not None else 0,
        "tokens_saved": ctx.tokens_saved,
        "tokens_cut": ctx.tokens_cut,
        "cost_usd": cost.total,
        "cost": {"prompt": cost.prompt, "completion": cost.completion, "retries": cost.retries,
                 "embeddings": cost.embeddings, "overhead": cost.overhead},
        "cost_saved_usd": ctx.cost_saved_usd,
        "retry": retry,
        "cache_status": ctx.cache_status,
        "budget_status": ctx.budget_status,
        "embedding_calls": ctx.embedding_calls,
        "degraded": list(ctx.degraded),
        "latency_ms": {"total": _r(ctx.elapsed_ms), "ttft": _r(timings.get("ttft")),
                       "upstream": _r(timings.get("upstream")), "gateway": _r(gateway_ms)},
        "timings_ms": dict(timings),
    }


def encode(record: dict) -> bytes:
    return _encode(record).encode()


class JsonlFile:
    """Appends records to a JSON Lines file, rotating it by size; safe across processes.

    Each batch is written under an exclusive ``flock`` on ``<path>.lock``: the size check, the
    rotation (``usage.jsonl`` -> ``usage.jsonl.1`` -> ... -> ``.<backups>``, the oldest deleted) and
    the append happen together, so several workers (or gateways on one host) share one file without
    interleaving lines or rotating twice. Disk use is bounded by ``max_bytes × (backups + 1)``.
    Blocking I/O: call it from a thread (the plugin does).
    """

    def __init__(self, path: str | os.PathLike, *, max_bytes: int = 64 * 1024 * 1024, backups: int = 5):
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups

    def write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(line + b"\n" for line in lines)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    size = self.path.stat().st_size
                except FileNotFoundError:
                    size = 0
                if size and size + len(data) > self.max_bytes:
                    self._rotate()
                with open(self.path, "ab") as out:
                    out.write(data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _rotate(self) -> None:
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
            return
        oldest = Path(f"{self.path}.{self.backups}")
        oldest.unlink(missing_ok=True)
        for i in range(self.backups - 1, 0, -1):
            src = Path(f"{self.path}.{i}")
            if src.exists():
                src.rename(f"{self.path}.{i + 1}")
        self.path.rename(f"{self.path}.1")


def jsonl_files(path: str | os.PathLike) -> list[Path]:
    """A usage file and its rotated copies (oldest first), or every ``*.jsonl*`` in a directory."""
    p = Path(path)
    if p.is_dir():
        found = [Path(f) for f in glob.glob(str(p / "*.jsonl*")) if not f.endswith(".lock")]
    else:
        found = [Path(f) for f in glob.glob(glob.escape(str(p)) + "*") if not f.endswith(".lock")]

    def age(f: Path) -> tuple:
        suffix = f.name.rsplit(".", 1)[-1]
        return (str(f.parent), f.name.split(".jsonl")[0], -int(suffix) if suffix.isdigit() else 0)

    return sorted(found, key=age)


def parse_lines(lines: Iterable[bytes | str]) -> Iterator[dict]:
    """Records from JSON lines; a damaged line (a crash mid-write) is skipped."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "ts" in record:
            yield record


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    for f in jsonl_files(path):
        with open(f, "rb") as fh:
            yield from parse_lines(fh)


def read_redis(url: str, key: str) -> list[dict]:
    """Every record in the Redis stream ``key`` (the full key, prefix included); ``url`` may be a
    ``redis+cluster://`` cluster."""
    from extproc.state.redis_store import sync_client

    client = sync_client(url, timeout=5)
    try:
        out, last = [], "-"
        while True:
            rows = client.xrange(key, min=last, count=10000)
            if last != "-":
                rows = rows[1:]
            if not rows:
                return out
            out.extend(parse_lines(f[b"r"] for _id, f in rows if b"r" in f))
            last = rows[-1][0]
    finally:
        client.close()
