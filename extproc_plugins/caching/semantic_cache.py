"""Semantic cache: a request that *means* the same as a stored one is answered with its answer.

The text that matters (``mode``: the last user turn, or the whole conversation) is embedded with
all-MiniLM-L6-v2 (the worker's embedder, :func:`extproc.embeddings.prompt.prompt_embedder`: NumPy, off the event
loop, concurrent lookups batched, recent texts cached, and the routers' embedding of the same last
user turn reused rather than computed twice) and compared by
cosine similarity with the entries of its *scope*: everything else must be identical (tenant, tier,
model, system prompt and earlier turns, sampling parameters; see
:func:`extproc_plugins.caching.cache_keys.semantic_parts`), so a different system prompt, model, tier, tenant or
temperature never matches. A candidate at or above ``threshold`` must also pass the guard
(:mod:`extproc_plugins.caching.semantic_guard`: same numbers, negation, names, no opposite words, no swapped
direction), because embeddings alone put "capital of France" next to "capital of Germany", and then
the verification of :mod:`extproc_plugins.caching.semantic_verify` (the two prompts aligned token by
token; what differs judged: closed-class words, negating prefixes, degree words, swapped order, and
a small substitution's own spans embedded with the same MiniLM). See the README for its figures.

A hit is answered from the request phase like an exact hit (JSON or SSE), with
``x-extproc-cache: semantic_hit`` and ``x-extproc-cache-similarity``; ``usage`` reports this
request's prompt tokens and the stored completion's.

Storage: answers in the gateway's Redis (or a bounded per-worker memory store), vectors in
:mod:`extproc_plugins.caching.vector_index` (plain Redis or memory), at most ``max_per_scope`` per scope, least
recently used out first, each with the answer's TTL. Same storing rules as the exact cache
(deterministic requests, complete answers). Redis unavailable: no semantic cache, never a failed
request. The encoder failing to load fails start-up (``fail_closed``) or disables the policy
(``fail_open``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from extproc.embeddings import prompt as prompts
from extproc.formats import tokens
from extproc.state.breaker import Breaker
from extproc_plugins.caching.cache_control import CacheTTL, parse_cache_headers
from extproc_plugins.caching.cache_keys import Normalization, deterministic, fingerprint, normalize_text, semantic_parts
from extproc_plugins.caching.cached_answer import (
    CachedAnswer, completed_answer, feed_shared_capture, note_bypass, note_lookup, note_miss, serve,
    shared_capture,
)
from extproc.framework.hookspecs import hookimpl
from extproc.upstreams.registry import default_max_tokens
from extproc_plugins.caching.semantic_guard import GuardChecks, compatible
from extproc.state.memory import MemoryStore
from extproc.state.store import StoreUnavailable
from extproc_plugins.caching.semantic_verify import EDIT_MIN_COSINE, SPAN_MIN_COSINE, spans_agree, structure
from extproc_plugins.caching.vector_index import open_vector_index

NAME = "semantic_cache"
log = logging.getLogger(__name__)
LAYER = "semantic"


class _Guard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    numbers: bool = True
    negation: bool = True
    entities: bool = True
    contrast: bool = True
    direction: bool = True
    align: bool = Field(True, description="verify the candidate by aligning the two prompts "
                        "(extproc_plugins.caching.semantic_verify): closed-class words, negating prefixes, "
                        "degree words, swapped word order")
    span_min_cosine: float = Field(SPAN_MIN_COSINE, ge=0, le=1, description="a small substitution's own "
                                   "spans must embed at least this close (0: not checked)")
    edit_min_cosine: float = Field(EDIT_MIN_COSINE, ge=0, le=1, description="in a near-identical pair, "
                                   "a content word replaced by another must embed at least this close "
                                   "(extproc_plugins.caching.semantic_edit; 1: never accepted)")


@dataclass(slots=True)
class _Pending:
    scope: str
    text: str
    vector: np.ndarray
    ttl: float


class SemanticCache:
    """Answer paraphrases of stored requests from the cache."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        threshold: float = Field(0.75, ge=0, le=1, description="minimum cosine similarity for a candidate "
                                 "(each candidate is then verified: the guard and the alignment)")
        mode: Literal["last_user", "conversation"] = "last_user"
        guard: _Guard = Field(default_factory=_Guard)
        ttl: CacheTTL = Field(default_factory=CacheTTL)
        max_temperature: float = Field(0.0, ge=0, le=2)
        default_temperature: float = Field(1.0, ge=0, le=2)
        store_finish_reasons: list[str] = Field(default_factory=lambda: ["stop", "length"])
        normalization: Normalization = Field(default_factory=Normalization)
        max_text_chars: int = Field(2000, gt=0, description="longer texts are not matched by meaning")
        top_k: int = Field(4, ge=1, le=32, description="candidates checked per lookup")
        max_per_scope: int = Field(256, ge=1, le=4096)
        max_vectors: int = Field(50_000, ge=1, description="vectors held per worker (memory index or mirror)")
        dedupe_above: float = Field(0.995, ge=0, le=1, description="a miss this close to an entry is not stored again")
        reuse_embeddings: bool = Field(True, description="use the worker's embedding cache (shared with the "
                                       "routers); false: encode every lookup afresh (benchmarks)")
        max_answer_bytes: int = Field(256 * 1024, gt=0)
        memory_max_bytes: int = Field(64 * 1024 * 1024, gt=0)
        store_retry_seconds: float = Field(1.0, gt=0)

    def __init__(self, settings: "SemanticCache.Settings"):
        self.settings = settings
        self.checks = GuardChecks(**settings.guard.model_dump(exclude={"align", "span_min_cosine",
                                                                     "edit_min_cosine"}))
        self.store = None
        self.index = None
        self.encoder = None  # the worker's embedder (extproc.embeddings.prompt.prompt_embedder), once loaded
        self.breaker = Breaker(NAME, settings.store_retry_seconds)
        self._tasks: set[asyncio.Task] = set()  # LRU touches in flight (bounded by hits in flight)

    @hookimpl
    async def extproc_startup(self, gateway):
        s = self.settings
        store = gateway.store
        self.store = MemoryStore(max_bytes=s.memory_max_bytes) if isinstance(store, MemoryStore) else store
        self.index = open_vector_index(store, max_per_scope=s.max_per_scope, max_vectors=s.max_vectors,
                                       scope_ttl=max(s.ttl.default_seconds, s.ttl.max_seconds))
        embedder = prompts.prompt_embedder()
        await asyncio.to_thread(embedder.load)
        await embedder.batcher.encode("warm up")
        self.encoder = embedder
        for encoding in {tier.tokenizer for tier in gateway.tiers.tiers.values()}:  # for hits' usage
            try:
                await asyncio.to_thread(tokens.get_encoding, encoding)
            except ValueError:
                pass

    async def embed(self, ctx, text: str) -> np.ndarray:
        """The text's embedding, computed off the event loop by the worker's embedder (one thread,
        concurrent lookups batched). When the routers already embedded the same text for this
        request (the last user turn), that embedding is reused: no second encoding."""
        embedder = self.encoder
        if not self.settings.reuse_embeddings:
            vector = await embedder.batcher.encode(text)
            ctx.embedding_calls += 1
            return vector
        if normalize_text(prompts.route_text(ctx), self.settings.normalization) == text:
            return await prompts.prompt_embedding(ctx, embedder)
        vector, computed = await embedder.embed_text(text)
        if computed:
            ctx.embedding_calls += 1
        return vector

    @hookimpl
    async def extproc_before_upstream(self, ctx, upstream):
        s = self.settings
        if self.encoder is None:  # start-up failed and the policy is fail_open
            note_lookup(ctx, LAYER, "unavailable")
            return None
        if not deterministic(ctx.request, max_temperature=s.max_temperature, default_temperature=s.default_temperature):
            note_lookup(ctx, LAYER, "skip")
            return None
        directives = parse_cache_headers(ctx.headers)
        tier = ctx.tier_config
        parts = semantic_parts(ctx.request, tenant=ctx.tenant, tier=ctx.tier, model=tier.model if tier else None,
                               mode=s.mode, norm=s.normalization,
                               default_max_tokens=default_max_tokens(tier))
        if parts is None or len(parts[1]) > s.max_text_chars:
            note_lookup(ctx, LAYER, "skip")
            return None
        ttl = s.ttl.resolve(path=ctx.path, workflow=ctx.workflow, tenant=ctx.tenant, directives=directives)
        if directives.no_cache:
            note_lookup(ctx, LAYER, "bypass")
            note_bypass(ctx)
            if ttl <= 0:
                return None
        if self.breaker.open:
            note_lookup(ctx, LAYER, "unavailable")
            return None
        started = time.perf_counter()
        scope, text = "sc:" + fingerprint(parts[0]), parts[1]
        vector = await self.embed(ctx, text)
        best = -1.0
        if not directives.no_cache:
            try:
                reply, best = await self._lookup(ctx, scope, text, vector, directives)
                self.breaker.ok()
            except StoreUnavailable as exc:
                self.breaker.failed(exc)
                note_lookup(ctx, LAYER, "error")
                ctx.timings_ms[NAME] = (time.perf_counter() - started) * 1000.0
                return None
            ctx.timings_ms[NAME] = (time.perf_counter() - started) * 1000.0
            if reply is not None:
                return reply
            note_miss(ctx)
        if ttl > 0 and best < s.dedupe_above:
            shared_capture(ctx, s.max_answer_bytes)
            ctx.plugin_state[NAME] = _Pending(scope, text, vector, ttl)
        return None

    async def _lookup(self, ctx, scope: str, text: str, vector: np.ndarray, directives):
        """Serve the best compatible candidate; returns ``(reply or None, best similarity seen)``."""
        s = self.settings
        candidates = await self.index.search(scope, vector, k=s.top_k, min_score=s.threshold)
        best = candidates[0][1] if candidates else -1.0
        result = "miss"
        for entry_id, score in candidates:
            data = await self.store.get("sa:" + entry_id)
            if data is None:  # its answer expired or was evicted: drop the vector too
                await self.index.remove(scope, entry_id)
                continue
            try:
                answer = CachedAnswer.from_bytes(data)
            except ValueError:
                continue
            ok, _why = await self.verify(answer.query or "", text)
            if not ok:
                result = "guard_rejected"
                continue
            if directives.max_age is not None and answer.age() > directives.max_age:
                result = "stale"
                continue
            self._background(self.index.touch(scope, entry_id))  # an LRU hint: not worth waiting for
            return serve(ctx, answer, status="semantic_hit", layer=LAYER, similarity=score,
                         prompt_tokens=self._prompt_tokens(ctx)), best
        note_lookup(ctx, LAYER, result)
        return None, best

    async def verify(self, stored: str, text: str) -> tuple[bool, str]:
        """Whether ``text`` may be answered with the answer stored for ``stored`` (a candidate the
        index found at or above the threshold): the lexicon guard, then the alignment of the two
        prompts (with the edit check of :mod:`extproc_plugins.caching.semantic_edit`), then the embeddings
        of the replaced words of a near-identical pair and of a small substitution's own spans.
        ``(ok, which check said no)``."""
        ok, why = compatible(stored, text, self.checks)
        if not ok:
            return False, why
        g = self.settings.guard
        if not g.align:
            return True, ""
        verdict = structure(stored, text)
        if not verdict.ok:
            return False, verdict.reason
        loose = verdict.spans if g.span_min_cosine > 0 else ()
        if not loose and not verdict.edit_spans:
            return True, ""
        vectors = await self._span_vectors(verdict.edit_spans + loose)  # one encoder call for both
        n = 2 * len(verdict.edit_spans)
        ok, why = spans_agree(verdict.edit_spans, vectors[:n], g.edit_min_cosine, "edit:replaced")
        if not ok:
            return ok, why
        return spans_agree(loose, vectors[n:], g.span_min_cosine)

    async def _span_vectors(self, spans) -> np.ndarray:
        """The spans' embeddings (``a`` then ``b`` of each pair), through the worker's embedding cache."""
        embedder = self.encoder
        texts = [t for pair in spans for t in pair]
        vectors = [embedder.cache.get(t) for t in texts]
        missing = sorted({t for t, v in zip(texts, vectors) if v is None})
        if missing:
            fresh = dict(zip(missing, await embedder.batcher.encode_many(missing)))
            for t, v in fresh.items():
                embedder.cache.put(t, v)
            vectors = [v if v is not None else fresh[t] for t, v in zip(texts, vectors)]
        return np.stack(vectors)

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if isinstance(exc, StoreUnavailable):
            self.breaker.failed(exc)
        elif exc is not None:
            log.warning("semantic_cache: background LRU touch failed: %r", exc)

    @staticmethod
    def _prompt_tokens(ctx) -> int | None:
        if ctx.prompt_tokens_estimate is not None:
            return ctx.prompt_tokens_estimate
        encoding = ctx.tier_config.tokenizer if ctx.tier_config else "cl100k_base"
        req = ctx.request
        try:
            if req.endpoint == "chat":
                return tokens.count_chat(req.messages, encoding)
            return tokens.count_text(req.prompt or "", encoding)
        except ValueError:
            return None

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
        answer.query = pending.text
        entry_id = fingerprint([pending.scope, pending.text])
        try:
            await self.store.set("sa:" + entry_id, answer.to_bytes(), ttl=pending.ttl)
            await self.index.add(pending.scope, entry_id, pending.vector, ttl=pending.ttl)
            self.breaker.ok()
        except StoreUnavailable as exc:
            self.breaker.failed(exc)
