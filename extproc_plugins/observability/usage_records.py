"""Usage records: one record per request (tenant, workflow, tier, tokens, cost split, cache, latencies).

The record (schema in :mod:`extproc.observability.usage`) is built in ``extproc_request_finished`` and queued in
memory; a background task writes the queue in batches every ``flush_seconds`` (or as soon as
``batch_size`` records wait), so the request never waits on a disk or on Redis:

* ``sink: file`` — a JSON Lines file (``path``), rotated at ``max_file_bytes`` keeping ``backups``
  copies, shared safely by every worker (``flock``); encoding and writing run in a thread.
* ``sink: redis`` — a Redis stream (``stream`` key, under ``state.key_prefix``) capped near
  ``stream_maxlen`` entries, one pipelined round trip per batch. While Redis is unreachable the
  batch goes to the file instead (counted ``fallback``), so records are not lost.
* ``sink: auto`` (default) — Redis when ``state.redis_url`` is set, else the file.

Memory is bounded: at most ``max_pending`` records wait; past that the oldest are dropped and
counted (``extproc_usage_records_total{result="dropped"}``). On shutdown the queue is flushed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from extproc.observability.cost_model import gateway_ms
from extproc.framework.hookspecs import hookimpl
from extproc.observability.metrics import get_metrics
from extproc.state.store import StoreUnavailable
from extproc.observability.usage import DEFAULT_STREAM, JsonlFile, build_record, encode

log = logging.getLogger(__name__)


class UsageRecords:
    """Write a usage record per request to a JSON Lines file or a Redis stream."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        sink: Literal["auto", "file", "redis"] = "auto"
        path: str = Field(".run/usage/usage.jsonl", description="the JSON Lines file (also the Redis fallback)")
        max_file_bytes: int = Field(64 * 1024 * 1024, gt=0)
        backups: int = Field(5, ge=0, description="rotated files kept")
        stream: str = Field(DEFAULT_STREAM, description="Redis stream key (after state.key_prefix)")
        stream_maxlen: int = Field(1_000_000, gt=0, description="entries kept in the stream (approximately)")
        flush_seconds: float = Field(1.0, gt=0, le=60)
        batch_size: int = Field(500, gt=0, description="flush early once this many records wait")
        max_pending: int = Field(50_000, gt=0, description="records kept in memory at most; the oldest drop")

    def __init__(self, settings: "UsageRecords.Settings | None" = None):
        self.settings = s = settings or self.Settings()
        self.file = JsonlFile(s.path, max_bytes=s.max_file_bytes, backups=s.backups)
        self.pending: deque[dict] = deque()
        self.dropped = 0
        self.store = None
        self.sink = "file"
        self.cost_model = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._last_error = 0.0
        self.m = get_metrics()

    @hookimpl
    async def extproc_startup(self, gateway):
        self.cost_model = gateway.cost_model
        if self.settings.sink == "redis" or (self.settings.sink == "auto" and gateway.config.state.redis_url):
            self.sink, self.store = "redis", gateway.store
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._task = asyncio.get_running_loop().create_task(self._run())

    @hookimpl
    def extproc_request_finished(self, ctx):
        cost = self.cost_model.breakdown(ctx)
        record = build_record(ctx, cost, retry=self.cost_model.is_retry(ctx), gateway_ms=gateway_ms(ctx.timings_ms))
        pending = self.pending
        if len(pending) >= self.settings.max_pending:
            pending.popleft()
            self.dropped += 1
            self.m.child(self.m.usage_records, (self.sink, "dropped")).inc()
        pending.append(record)
        if len(pending) >= self.settings.batch_size and self._wake is not None:
            self._wake.set()

    @hookimpl
    async def extproc_shutdown(self, gateway):
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.flush_seconds)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any one failure
                self._log_error("usage records: flush failed: %r", exc)

    async def flush(self) -> int:
        """Write every queued record now; returns how many were written (to any sink)."""
        async with self._flush_lock or asyncio.Lock():
            written = 0
            while self.pending:
                batch = [self.pending.popleft() for _ in range(min(len(self.pending), self.settings.batch_size))]
                lines = await asyncio.to_thread(lambda b=batch: [encode(r) for r in b])
                written += await self._write(lines)
            return written

    async def _write(self, lines: list[bytes]) -> int:
        if self.sink == "redis":
            try:
                await self.store.stream_add(self.settings.stream, lines, self.settings.stream_maxlen)
                self.m.child(self.m.usage_records, ("redis", "written")).inc(len(lines))
                return len(lines)
            except StoreUnavailable as exc:
                self._log_error("usage records: Redis unavailable (%s); writing to %s instead", exc, self.file.path)
                result = "fallback"
        else:
            result = "written"
        try:
            await asyncio.to_thread(self.file.write, lines)
        except OSError as exc:
            self._log_error("usage records: cannot write %s: %s; %d record(s) lost", self.file.path, exc, len(lines))
            self.m.child(self.m.usage_records, (self.sink, "dropped")).inc(len(lines))
            self.dropped += len(lines)
            return 0
        self.m.child(self.m.usage_records, (self.sink, result)).inc(len(lines))
        return len(lines)

    def _log_error(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last_error >= 10.0:
            self._last_error = now
            log.error(msg, *args)
