"""Shared state for policies: one small interface, in memory or in Redis.

Policies never talk to Redis directly: they get :attr:`Gateway.store <extproc.framework.gateway.Gateway.store>`,
which is a :class:`~extproc.state.memory.MemoryStore` (one process; the embedded default) or a
:class:`~extproc.state.redis_store.RedisStore` (shared by every worker and every gateway instance)
depending on ``state.redis_url`` (one Redis node, or a Redis Cluster with
``redis+cluster://host:port[,host:port]``: keys one operation touches together share a hash tag,
see :mod:`extproc.state.redis_store`). Both offer the same operations: bytes values with a TTL, atomic
counters, compare-and-set locks, capped logs, and records that are never evicted.

Operations a policy family needs atomically over several keys live with that family, on top of
these stores (budget reservations: :mod:`extproc_plugins.budgets.reservations`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:  # the gateway's config section; the store reads only its fields
    from extproc.framework.config import StateConfig


class Store(Protocol):
    """Key/value with TTL and atomic counters; every method may raise :class:`StoreUnavailable`."""

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...
    async def stream_add(self, key: str, entries: list[bytes], maxlen: int) -> None: ...
    async def stream_range(self, key: str, count: int | None = None) -> list[bytes]: ...
    async def set_nx(self, key: str, value: bytes, ttl: float) -> bool: ...
    async def delete_if(self, key: str, expected: bytes) -> bool: ...
    async def expire_if(self, key: str, expected: bytes, ttl: float) -> bool: ...
    # several values at once; records (never evicted)
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...
    async def put_record(self, key: str, value: bytes) -> None: ...
    async def get_record(self, key: str) -> bytes | None: ...
    async def get_records(self, keys: Sequence[str]) -> list[bytes | None]: ...
    async def delete_record(self, key: str) -> bool: ...


class StoreUnavailable(RuntimeError):
    """The backing store could not be reached; callers degrade (no cache) rather than fail."""


def open_store(config: "StateConfig") -> Store:
    """The store the configuration asks for."""
    if config.redis_url:
        from extproc.state.redis_store import RedisStore

        return RedisStore(config.redis_url, prefix=config.key_prefix)
    from extproc.state.memory import MemoryStore

    return MemoryStore(prefix=config.key_prefix)
