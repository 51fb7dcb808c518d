"""Exact cache: an identical request (after normalisation) is answered with the stored answer.

Looked up in ``extproc_before_upstream``, once the tier is chosen: the key holds the tenant, the
tier and its upstream model, and the canonical request (see :mod:`extproc_plugins.caching.cache_keys` for what is
and is not part of it). A hit is answered from the request phase (Envoy's ImmediateResponse): JSON,
or SSE for ``stream: true``, whichever way the stored answer was produced.

What is stored: complete answers of *deterministic* requests (temperature at most
``max_temperature``, 0 by default; a request without a temperature counts as
``default_temperature``), with a finish reason in ``store_finish_reasons``. ``length`` is stored by
default: ``max_tokens`` is part of the key, so only a request with the same limit gets the same
cut. Never stored: errors, streams the client left (aborted), answers without a finish reason,
tool calls, several choices, answers over ``max_answer_bytes``.

Where: the gateway's Redis when ``state.redis_url`` is set (shared by every worker and gateway),
with a small per-worker *near cache* of hot answers in front of it (``near_cache_seconds``, 2 s by
default: a hit then costs no Redis round trip; an answer may outlive its TTL or a refresh made
elsewhere by at most that long); otherwise a per-worker memory store of its own, bounded by
``memory_max_bytes`` (LRU), so cache pressure never evicts other policies' state.

Redis unavailable: no cache (lookups and stores are skipped for ``store_retry_seconds`` after a
failure), never a failed request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from extproc.state.breaker import Breaker
from extproc_plugins.caching.cache_control import CacheTTL, parse_cache_headers
from extproc_plugins.caching.cache_keys import Normalization, deterministic, exact_fingerprint
from extproc_plugins.caching.cached_answer import (
    CachedAnswer, completed_answer, feed_shared_capture, note_bypass, note_lookup, note_miss, serve,
    shared_capture,
)
from extproc.framework.hookspecs import hookimpl
from extproc.upstreams.registry import default_max_tokens
from extproc.state.memory import MemoryStore
from extproc.state.store import StoreUnavailable

NAME = "exact_cache"
LAYER = "exact"


@dataclass(slots=True)
class _Pending:
    """A miss whose answer is to be stored."""

    key: str
    ttl: float


class ExactCache:
    """Answer repeated identical requests from the cache."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        ttl: CacheTTL = Field(default_factory=CacheTTL)
        max_temperature: float = Field(0.0, ge=0, le=2, description="requests above are neither served nor stored")
        default_temperature: float = Field(1.0, ge=0, le=2, description="a request without one counts as this")
        store_finish_reasons: list[str] = Field(default_factory=lambda: ["stop", "length"])
        normalization: Normalization = Field(default_factory=Normalization)
        max_answer_bytes: int = Field(256 * 1024, gt=0)
        memory_max_bytes: int = Field(64 * 1024 * 1024, gt=0, description="bound of the per-worker memory store")
        near_cache_seconds: float = Field(
            2.0, ge=0, description="with Redis: keep hot answers in the worker this long too (0: off); an "
            "answer may then outlive its TTL, or a no-cache refresh elsewhere, by at most this much")
        near_cache_max_bytes: int = Field(8 * 1024 * 1024, gt=0)
        store_retry_seconds: float = Field(1.0, gt=0, description="after a store failure, skip it this long")

    def __init__(self, settings: "ExactCache.Settings"):
        self.settings = settings
        self.store = None
        self.near: MemoryStore | None = None  # per-worker copy of hot answers in front of Redis
        self.breaker = Breaker(NAME, settings.store_retry_seconds)

    @hookimpl
    def extproc_startup(self, gateway):
        store = gateway.store
        if isinstance(store, MemoryStore):
            self.store = MemoryStore(max_bytes=self.settings.memory_max_bytes)
        else:
            self.store = store
            if self.settings.near_cache_seconds > 0:
                self.near = MemoryStore(max_bytes=self.settings.near_cache_max_bytes)

    def key(self, ctx) -> str:
        return "xc:" + exact_fingerprint(ctx, norm=self.settings.normalization,
                                        default_max_tokens=default_max_tokens(ctx.tier_config))

    @hookimpl
    async def extproc_before_upstream(self, ctx, upstream):
        s = self.settings
        if not deterministic(ctx.request, max_temperature=s.max_temperature, default_temperature=s.default_temperature):
            note_lookup(ctx, LAYER, "skip")
            return None
        directives = parse_cache_headers(ctx.headers)
        started = time.perf_counter()
        key = self.key(ctx)
        if directives.no_cache:
            note_lookup(ctx, LAYER, "bypass")
            note_bypass(ctx)
        elif self.breaker.open:
            note_lookup(ctx, LAYER, "unavailable")
        else:
            answer, failed = await self._get(key)
            if failed:
                note_lookup(ctx, LAYER, "error")
            elif answer is None:
                note_lookup(ctx, LAYER, "miss")
            elif directives.max_age is None or answer.age() <= directives.max_age:
                ctx.timings_ms[NAME] = (time.perf_counter() - started) * 1000.0
                return serve(ctx, answer, status="hit", layer=LAYER)
            else:
                note_lookup(ctx, LAYER, "stale")
            note_miss(ctx)
        ttl = s.ttl.resolve(path=ctx.path, workflow=ctx.workflow, tenant=ctx.tenant, directives=directives)
        if ttl > 0:
            shared_capture(ctx, s.max_answer_bytes)
            ctx.plugin_state[NAME] = _Pending(key, ttl)
        ctx.timings_ms[NAME] = (time.perf_counter() - started) * 1000.0
        return None

    async def _get(self, key: str) -> tuple[CachedAnswer | None, bool]:
        """The stored answer (or None) and whether the store failed."""
        near = self.near
        data = await near.get(key) if near is not None else None
        if data is None:
            try:
                data = await self.store.get(key)
                self.breaker.ok()
            except StoreUnavailable as exc:
                self.breaker.failed(exc)
                return None, True
            if data is None:
                return None, False
            if near is not None:
                await near.set(key, data, ttl=self.settings.near_cache_seconds)
        try:
            return CachedAnswer.from_bytes(data), False
        except ValueError:
            return None, False  # corrupt or another version: a miss; the fresh answer overwrites it

    @hookimpl
    def extproc_response_chunk(self, ctx, chunk):
        feed_shared_capture(ctx, chunk)

    @hookimpl
    async def extproc_response_complete(self, ctx):
        pending = ctx.plugin_state.pop(NAME, None)
        if pending is None or self.breaker.open:
            return
        answer = completed_answer(ctx, self.settings.max_answer_bytes)
        if answer is None or answer.finish_reason not in self.settings.store_finish_reasons:
            return
        data = answer.to_bytes()
        try:
            await self.store.set(pending.key, data, ttl=pending.ttl)
            self.breaker.ok()
            if self.near is not None:
                await self.near.set(pending.key, data, ttl=min(pending.ttl, self.settings.near_cache_seconds))
        except StoreUnavailable as exc:
            self.breaker.failed(exc)
