"""Idempotency keys: a retried request carrying the same ``Idempotency-Key`` gets the stored answer.

For a request with an ``Idempotency-Key`` header (scoped to the tenant):

* first time: the key is claimed (SET NX, ``pending`` with the body's digest) and the request goes
  upstream; its complete answer is stored under the key for ``window_seconds``, whatever its
  temperature (the point is to get *the same* answer back);
* the same key with the same body (same JSON content; key order and spacing do not matter) within
  the window: the stored answer, replayed with its original id and ``created`` time, as JSON or
  SSE as this request asks (``x-extproc-cache: idempotent``); nothing goes upstream;
* the same key with a different body: **422** ``idempotency_key_reused``;
* the same key while the first is still running: waits up to ``wait_seconds`` for its answer, then
  **409** ``idempotency_key_in_use`` (retry later);
* a malformed key (empty, over ``max_key_length``, not printable ASCII): **400**
  ``invalid_idempotency_key``.

If the first request fails (an upstream error, the client leaving), its claim is released so a
retry goes upstream again: errors are not replayed. A claim whose gateway died expires after
``pending_ttl_seconds``.

Checked in ``extproc_request_parsed``, before any other policy spends anything: list it first.
Redis unavailable (or memory state with several workers): keys are honoured per worker only, or
not at all while the store is down; the request is never failed for it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from extproc.state.breaker import Breaker
from extproc_plugins.caching.cache_keys import body_hash, fingerprint
from extproc_plugins.caching.cached_answer import (
    CachedAnswer, completed_answer, feed_shared_capture, note_lookup, serve, shared_capture,
)
from extproc.framework.hookspecs import hookimpl
from extproc.formats.openai import OpenAIError
from extproc.state.memory import MemoryStore
from extproc.state.store import StoreUnavailable

NAME = "idempotency"
LAYER = "idempotency"
_PENDING, _DONE = b"P", b"D"


@dataclass(slots=True)
class _Claim:
    record_key: str
    claim: bytes
    body_hash: str
    stored: bool = False


class Idempotency:
    """Replay the answer of a request retried with the same Idempotency-Key."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        header: str = Field("idempotency-key", description="request header carrying the key (lower case)")
        window_seconds: float = Field(86400.0, gt=0, description="how long an answer is replayed")
        pending_ttl_seconds: float = Field(600.0, gt=0, description="a claim whose gateway died expires after this")
        wait_seconds: float = Field(10.0, ge=0, le=25, description="wait for a running first request, then 409")
        poll_ms: float = Field(20.0, gt=0)
        max_key_length: int = Field(255, ge=1)
        max_answer_bytes: int = Field(1024 * 1024, gt=0)
        memory_max_bytes: int = Field(64 * 1024 * 1024, gt=0)
        store_retry_seconds: float = Field(1.0, gt=0)

    def __init__(self, settings: "Idempotency.Settings"):
        self.settings = settings
        self.header = settings.header.lower()
        self.store = None
        self.tiers = None
        self.breaker = Breaker(NAME, settings.store_retry_seconds)

    @hookimpl
    def extproc_startup(self, gateway):
        store = gateway.store
        self.store = MemoryStore(max_bytes=self.settings.memory_max_bytes) if isinstance(store, MemoryStore) else store
        self.tiers = gateway.tiers

    def _check_key(self, key: str) -> None:
        if not key or len(key) > self.settings.max_key_length or not (key.isascii() and key.isprintable()):
            raise OpenAIError(
                400, f"Invalid Idempotency-Key: expected 1 to {self.settings.max_key_length} printable ASCII "
                     "characters.", code="invalid_idempotency_key")

    @hookimpl
    async def extproc_request_parsed(self, ctx):
        key = ctx.headers.get(self.header)
        if key is None:
            return None
        key = key.strip()
        self._check_key(key)
        if self.breaker.open:
            note_lookup(ctx, LAYER, "unavailable")
            return None
        record_key = "idem:" + fingerprint({"tenant": ctx.tenant, "key": key})
        digest = body_hash({"path": ctx.path, "body": ctx.request.raw})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.wait_seconds
        claim = _PENDING + digest.encode() + b":" + ctx.request_id.encode()
        try:
            while True:
                record = await self.store.get(record_key)
                if record is None:
                    if await self.store.set_nx(record_key, claim, self.settings.pending_ttl_seconds):
                        self.breaker.ok()
                        shared_capture(ctx, self.settings.max_answer_bytes)
                        ctx.plugin_state[NAME] = _Claim(record_key, claim, digest)
                        note_lookup(ctx, LAYER, "new")
                        return None
                    continue  # claimed by someone else just now: read it
                reply = self._answer_from(ctx, record, digest)
                if reply is not None:
                    return reply
                if loop.time() >= deadline:  # still pending
                    note_lookup(ctx, LAYER, "in_use")
                    raise OpenAIError(
                        409, "A request with this Idempotency-Key is still being processed; retry later.",
                        type="invalid_request_error", code="idempotency_key_in_use")
                await asyncio.sleep(min(self.settings.poll_ms / 1000.0, max(0.0, deadline - loop.time())))
        except StoreUnavailable as exc:
            self.breaker.failed(exc)
            note_lookup(ctx, LAYER, "error")
            return None

    def _answer_from(self, ctx, record: bytes, digest: str):
        """The replay for a finished record; raises 422 for another body; None while pending."""
        kind, rest = record[:1], record[1:]
        if kind == _PENDING:
            if not rest.startswith(digest.encode() + b":"):
                self._reused(ctx)
            return None
        try:
            answer = CachedAnswer.from_bytes(rest)
        except ValueError:
            return None
        if answer.body_hash != digest:
            self._reused(ctx)
        tier = self.tiers.tiers.get(answer.tier) if answer.tier else None
        return serve(ctx, answer, status="idempotent", layer=LAYER, replay=True, tier_config=tier)

    @staticmethod
    def _reused(ctx) -> None:
        note_lookup(ctx, LAYER, "conflict")
        raise OpenAIError(
            422, "This Idempotency-Key was already used with a different request body; use a new key for a "
                 "new request.", type="invalid_request_error", code="idempotency_key_reused")

    @hookimpl
    def extproc_response_chunk(self, ctx, chunk):
        feed_shared_capture(ctx, chunk)

    @hookimpl
    async def extproc_response_complete(self, ctx):
        claim = ctx.plugin_state.get(NAME)
        if claim is None:
            return
        answer = completed_answer(ctx, self.settings.max_answer_bytes)
        if answer is None:
            return
        answer.body_hash = claim.body_hash
        try:
            await self.store.set(claim.record_key, _DONE + answer.to_bytes(), ttl=self.settings.window_seconds)
            claim.stored = True
        except StoreUnavailable as exc:
            self.breaker.failed(exc)

    @hookimpl
    async def extproc_request_finished(self, ctx):
        claim = ctx.plugin_state.pop(NAME, None)
        if claim is None or claim.stored:
            return
        try:  # failed, aborted, not storable: release the claim so a retry goes upstream
            await self.store.delete_if(claim.record_key, claim.claim)
        except StoreUnavailable as exc:
            self.breaker.failed(exc)
