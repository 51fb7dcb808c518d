"""A bounded nearest-neighbour index of unit vectors, grouped by scope: in memory or on plain Redis.

The semantic cache keeps one *scope* per combination of everything that must match exactly
(tenant, tier, model, system prompt, sampling parameters...) and searches only within it, so a
search is a brute-force cosine over a small, bounded candidate set: one matrix-vector product in
NumPy (256 x 384 float32 is ~25 us). No search module is needed on Redis.

Both implementations keep, per scope, at most ``max_per_scope`` entries (least recently used out
first; a hit counts as a use), each with its own expiry (expired entries never match and are the
first to go).

**Memory** (:class:`MemoryVectorIndex`): per process; also bounded in total (``max_vectors``: the
least recently used scopes are dropped whole).

**Redis** (:class:`RedisVectorIndex`), shared by every worker and gateway. Per scope:

=============================  ===============================================================
``<prefix>vx:{<scope>}:v``     hash: entry id -> 8-byte expiry (unix seconds, float64) + the
                               vector (float32, little-endian)
``<prefix>vx:{<scope>}:lru``   sorted set: entry id -> last use (ms); the trim order
``<prefix>vx:{<scope>}:ver``   a random token, replaced on every insert or removal
=============================  ===============================================================

The scope in braces is a Redis Cluster hash tag: a scope's three keys share a slot (each script
touches one scope), while scopes spread over the cluster.

Inserting is one Lua script (add, trim to ``max_per_scope``, new token, refresh the scope's TTL),
so concurrent writers cannot push a scope past its bound. A search runs one script that returns
only the token when it equals the one this process last saw, and the whole hash otherwise: a
process keeps a *mirror* of recently searched scopes (bounded by ``mirror_max_vectors``), so the
usual search is one small round trip plus the NumPy product.
"""

from __future__ import annotations

import os
import struct
import time
from collections import OrderedDict
from typing import Protocol

import numpy as np

from extproc.state.lua import script
from extproc.state.memory import MemoryStore
from extproc.state.store import Store, StoreUnavailable

__all__ = ["VectorIndex", "MemoryVectorIndex", "RedisVectorIndex", "open_vector_index"]

_EXPIRY = struct.Struct("<d")


class VectorIndex(Protocol):
    """Scoped nearest-neighbour search over unit vectors; Redis errors raise StoreUnavailable."""

    async def search(self, scope: str, vector: np.ndarray, k: int = 4,
                     min_score: float = -1.0) -> list[tuple[str, float]]: ...
    async def add(self, scope: str, entry_id: str, vector: np.ndarray, ttl: float) -> None: ...
    async def touch(self, scope: str, entry_id: str) -> None: ...
    async def remove(self, scope: str, entry_id: str) -> None: ...


class _Bucket:
    """The vectors of one scope: a growable float32 matrix with ids, expiries and last uses."""

    __slots__ = ("dim", "cap", "ids", "pos", "matrix", "expires", "used", "token")

    def __init__(self, dim: int, cap: int, initial: int = 8):
        self.dim, self.cap = dim, cap
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}
        size = max(1, min(initial, cap))
        self.matrix = np.empty((size, dim), np.float32)
        self.expires = np.empty(size, np.float64)
        self.used = np.empty(size, np.float64)
        self.token: bytes | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def _grow(self) -> None:
        size = min(self.cap, max(1, len(self.matrix) * 2))
        for name in ("matrix", "expires", "used"):
            old = getattr(self, name)
            new = np.empty((size, *old.shape[1:]), old.dtype)
            new[: len(self.ids)] = old[: len(self.ids)]
            setattr(self, name, new)

    def upsert(self, entry_id: str, vector: np.ndarray, expires: float, now: float) -> str | None:
        """Insert or replace; returns the id evicted to make room, if any."""
        evicted = None
        i = self.pos.get(entry_id)
        if i is None:
            n = len(self.ids)
            if n >= self.cap:
                i = self._victim(now)
                evicted = self.ids[i]
                del self.pos[evicted]
                self.ids[i] = entry_id
            else:
                if n >= len(self.matrix):
                    self._grow()
                i = n
                self.ids.append(entry_id)
            self.pos[entry_id] = i
        self.matrix[i] = vector
        self.expires[i] = expires
        self.used[i] = now
        return evicted

    def _victim(self, now: float) -> int:
        n = len(self.ids)
        expired = np.flatnonzero(self.expires[:n] <= now)
        if expired.size:
            return int(expired[0])
        return int(np.argmin(self.used[:n]))

    def remove(self, entry_id: str) -> None:
        i = self.pos.pop(entry_id, None)
        if i is None:
            return
        last = len(self.ids) - 1
        if i != last:
            moved = self.ids[last]
            self.ids[i] = moved
            self.pos[moved] = i
            self.matrix[i] = self.matrix[last]
            self.expires[i] = self.expires[last]
            self.used[i] = self.used[last]
        self.ids.pop()

    def touch(self, entry_id: str, now: float) -> None:
        i = self.pos.get(entry_id)
        if i is not None:
            self.used[i] = now

    def search(self, vector: np.ndarray, k: int, min_score: float, now: float) -> list[tuple[str, float]]:
        n = len(self.ids)
        if n == 0:
            return []
        scores = self.matrix[:n] @ vector
        scores[self.expires[:n] <= now] = -np.inf
        k = min(k, n)
        top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.argsort(-scores[top])]
        return [(self.ids[i], float(scores[i])) for i in top if scores[i] >= min_score]


def _unit(vector: np.ndarray, dim: int) -> np.ndarray:
    v = np.asarray(vector, np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise ValueError(f"vector has {v.shape[0]} dimensions, the index {dim}")
    return v


class MemoryVectorIndex:
    """Per-process scoped index, bounded per scope and in total."""

    def __init__(self, dim: int = 384, *, max_per_scope: int = 256, max_vectors: int = 50_000):
        self.dim, self.max_per_scope, self.max_vectors = dim, max_per_scope, max_vectors
        self._scopes: OrderedDict[str, _Bucket] = OrderedDict()
        self._total = 0

    @property
    def total(self) -> int:
        return self._total

    async def search(self, scope: str, vector: np.ndarray, k: int = 4, min_score: float = -1.0):
        bucket = self._scopes.get(scope)
        if bucket is None:
            return []
        self._scopes.move_to_end(scope)
        return bucket.search(_unit(vector, self.dim), k, min_score, time.time())

    async def add(self, scope: str, entry_id: str, vector: np.ndarray, ttl: float) -> None:
        vector = _unit(vector, self.dim)
        bucket = self._scopes.get(scope)
        if bucket is None:
            bucket = self._scopes[scope] = _Bucket(self.dim, self.max_per_scope)
        self._scopes.move_to_end(scope)
        before = len(bucket)
        now = time.time()
        bucket.upsert(entry_id, vector, now + ttl, now)
        self._total += len(bucket) - before
        while self._total > self.max_vectors and len(self._scopes) > 1:
            _, dropped = self._scopes.popitem(last=False)
            self._total -= len(dropped)

    async def touch(self, scope: str, entry_id: str) -> None:
        bucket = self._scopes.get(scope)
        if bucket is not None:
            bucket.touch(entry_id, time.time())

    async def remove(self, scope: str, entry_id: str) -> None:
        bucket = self._scopes.get(scope)
        if bucket is not None:
            before = len(bucket)
            bucket.remove(entry_id)
            self._total -= before - len(bucket)


class RedisVectorIndex:
    """The scoped index on plain Redis, with a bounded per-process mirror of searched scopes."""

    def __init__(self, client, prefix: str, errors: tuple, dim: int = 384, *, max_per_scope: int = 256,
                 mirror_max_vectors: int = 50_000, scope_ttl: float = 7 * 86400):
        self._redis, self.prefix, self._errors = client, prefix + "vx:", errors
        self.dim, self.max_per_scope = dim, max_per_scope
        self.mirror_max_vectors, self.scope_ttl = mirror_max_vectors, scope_ttl
        self._add = client.register_script(script(__package__, "vector_add"))
        self._fetch = client.register_script(script(__package__, "vector_fetch"))
        self._remove = client.register_script(script(__package__, "vector_remove"))
        self._mirror: OrderedDict[str, _Bucket] = OrderedDict()
        self._mirrored = 0
        self._blob_size = _EXPIRY.size + 4 * dim

    def _keys(self, scope: str) -> tuple[str, str, str]:
        base = f"{self.prefix}{{{scope}}}"  # the hash tag: one slot per scope
        return base + ":v", base + ":lru", base + ":ver"

    async def _do(self, coro):
        try:
            return await coro
        except self._errors as exc:
            raise StoreUnavailable(str(exc)) from exc

    @property
    def mirrored(self) -> int:
        """Vectors held in this process's mirror (bounded by ``mirror_max_vectors``)."""
        return self._mirrored

    def _rebuild(self, scope: str, token: bytes, flat: list) -> _Bucket:
        bucket = _Bucket(self.dim, self.max_per_scope, initial=max(1, len(flat) // 2))
        now = time.time()
        for i in range(0, len(flat) - 1, 2):
            entry_id, blob = flat[i], flat[i + 1]
            if len(blob) != self._blob_size:
                continue
            (expires,) = _EXPIRY.unpack_from(blob)
            if expires <= now:
                continue
            vec = np.frombuffer(blob, np.float32, self.dim, _EXPIRY.size)
            bucket.upsert(entry_id.decode() if isinstance(entry_id, bytes) else entry_id, vec, expires, now)
        bucket.token = token
        old = self._mirror.pop(scope, None)
        if old is not None:
            self._mirrored -= len(old)
        self._mirror[scope] = bucket
        self._mirrored += len(bucket)
        while self._mirrored > self.mirror_max_vectors and len(self._mirror) > 1:
            _, dropped = self._mirror.popitem(last=False)
            self._mirrored -= len(dropped)
        return bucket

    async def search(self, scope: str, vector: np.ndarray, k: int = 4, min_score: float = -1.0):
        vector = _unit(vector, self.dim)
        v_key, _, ver_key = self._keys(scope)
        bucket = self._mirror.get(scope)
        known = bucket.token if bucket is not None else b""
        reply = await self._do(self._fetch(keys=[v_key, ver_key], args=[known or b"-"]))
        token = reply[0] if reply else None
        if not token:  # the scope does not exist (never written, or expired)
            if bucket is not None:
                self._mirrored -= len(self._mirror.pop(scope))
            return []
        if len(reply) > 1 or bucket is None or token != known:
            bucket = self._rebuild(scope, token, reply[1:])
        else:
            self._mirror.move_to_end(scope)
        return bucket.search(vector, k, min_score, time.time())

    async def add(self, scope: str, entry_id: str, vector: np.ndarray, ttl: float) -> None:
        vector = _unit(vector, self.dim)
        expires = time.time() + ttl
        blob = _EXPIRY.pack(expires) + vector.astype("<f4", copy=False).tobytes()
        now_ms = int(time.time() * 1000)
        scope_ttl_ms = int(max(self.scope_ttl, ttl) * 1000)
        await self._do(self._add(keys=list(self._keys(scope)),
                                 args=[entry_id, blob, now_ms, self.max_per_scope, scope_ttl_ms, os.urandom(8)]))

    async def touch(self, scope: str, entry_id: str) -> None:
        _, lru_key, _ = self._keys(scope)
        await self._do(self._redis.zadd(lru_key, {entry_id: int(time.time() * 1000)}, xx=True))
        bucket = self._mirror.get(scope)
        if bucket is not None:
            bucket.touch(entry_id, time.time())

    async def remove(self, scope: str, entry_id: str) -> None:
        await self._do(self._remove(keys=list(self._keys(scope)), args=[entry_id, os.urandom(8)]))


def open_vector_index(store: Store, *, dim: int = 384, max_per_scope: int = 256, max_vectors: int = 50_000,
                      scope_ttl: float = 7 * 86400) -> VectorIndex:
    """The index matching the gateway's store: Redis when the store is Redis, else in memory."""
    client = getattr(store, "client", None)
    if client is None or isinstance(store, MemoryStore):
        return MemoryVectorIndex(dim, max_per_scope=max_per_scope, max_vectors=max_vectors)
    return RedisVectorIndex(client, store.prefix, store.errors, dim, max_per_scope=max_per_scope,
                            mirror_max_vectors=max_vectors, scope_ttl=scope_ttl)
