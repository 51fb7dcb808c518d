"""The in-process store: bounded (least recently used out first), per-key TTL, one worker's own.

A gateway under sustained load does not grow without limit: ``max_bytes`` bounds the real memory
of the cache entries. Records (API keys, budget settings) are outside that bound's LRU and capped
by count. Everything here is **per worker process**: with several workers each has its own copy.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict, deque
from typing import Sequence

from extproc.state.store import StoreUnavailable


#: What an entry of :class:`MemoryStore` costs in CPython besides its key and value objects: the
#: ``(value, expiry)`` tuple (56 B), the expiry float (24 B) and its slot and link in the
#: OrderedDict (about 110 B, amortised). Measured with tracemalloc: with it the accounted bytes
#: match the real ones within a few per cent from 16-byte to 4 KB values; without it (key and
#: value lengths + 64) a store of small entries (locks, claims) really held 2.3 to 2.7 times its
#: ``max_bytes``.
ENTRY_OVERHEAD = 192


class MemoryStore:
    """An in-process store bounded by ``max_bytes`` (LRU eviction) with per-key TTL.

    ``max_bytes`` bounds the real memory of the entries (Python objects included, see
    :data:`ENTRY_OVERHEAD`), not only the length of their keys and values.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, prefix: str = "", *, max_records: int = 100_000):
        self.max_bytes = max_bytes
        self.prefix = prefix
        self._data: OrderedDict[str, tuple[bytes | int, float | None]] = OrderedDict()
        self._bytes = 0
        # Records (API keys, budget settings) live outside the LRU: never evicted by cache pressure.
        self.max_records = max_records
        self._records: dict[str, bytes] = {}
        self._on_close: list = []  # what else keeps state in this store (budget reservations)
        self._streams: dict[str, deque[bytes]] = {}

    @staticmethod
    def _size(key: str, value) -> int:
        # counters (ints) count a fixed 32 B, so an entry's size never changes as it is incremented
        return sys.getsizeof(key) + (sys.getsizeof(value) if isinstance(value, bytes) else 32) + ENTRY_OVERHEAD

    def _live(self, key: str):
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= time.monotonic():
            self._remove(key)
            return None
        self._data.move_to_end(key)
        return item

    def _remove(self, key: str) -> None:
        value, _ = self._data.pop(key)
        self._bytes -= self._size(key, value)

    def _put(self, key: str, value, ttl: float | None) -> None:
        if key in self._data:
            self._remove(key)
        size = self._size(key, value)
        if size > self.max_bytes:
            return
        self._data[key] = (value, time.monotonic() + ttl if ttl else None)
        self._bytes += size
        self._evict()

    def _evict(self) -> None:
        """Drop the least recently used entries until the store is within ``max_bytes``."""
        while self._bytes > self.max_bytes and self._data:
            self._remove(next(iter(self._data)))

    @property
    def used_bytes(self) -> int:
        return self._bytes

    async def get(self, key: str) -> bytes | None:
        item = self._live(self.prefix + key)
        return item[0] if item is not None and isinstance(item[0], bytes) else None

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self._put(self.prefix + key, bytes(value), ttl)

    async def delete(self, key: str) -> None:
        if self.prefix + key in self._data:
            self._remove(self.prefix + key)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        key = self.prefix + key
        item = self._live(key)
        if item is None:
            value, expires = amount, (time.monotonic() + ttl if ttl else None)
        else:
            value, expires = int(item[0]) + amount, item[1]
        self._data[key] = (value, expires)
        if item is None:
            self._bytes += self._size(key, value)
            self._evict()  # a new counter counts against max_bytes like any entry
        return value

    async def ping(self) -> bool:
        return True

    async def stream_add(self, key: str, entries: list[bytes], maxlen: int) -> None:
        """Append entries to a capped log (the oldest fall off past ``maxlen``)."""
        stream = self._streams.get(self.prefix + key)
        if stream is None or stream.maxlen != maxlen:
            stream = self._streams[self.prefix + key] = deque(stream or (), maxlen=maxlen)
        stream.extend(bytes(e) for e in entries)

    async def stream_range(self, key: str, count: int | None = None) -> list[bytes]:
        """The log's entries, oldest first (the first ``count`` of them)."""
        entries = list(self._streams.get(self.prefix + key, ()))
        return entries if count is None else entries[:count]

    async def set_nx(self, key: str, value: bytes, ttl: float) -> bool:
        """Set ``key`` only if it is absent (a lock or a claim); True when this call set it."""
        if self._live(self.prefix + key) is not None:
            return False
        self._put(self.prefix + key, bytes(value), ttl)
        return True

    async def delete_if(self, key: str, expected: bytes) -> bool:
        """Delete ``key`` only if it still holds ``expected`` (release a lock this caller owns)."""
        item = self._live(self.prefix + key)
        if item is None or item[0] != expected:
            return False
        self._remove(self.prefix + key)
        return True

    async def expire_if(self, key: str, expected: bytes, ttl: float) -> bool:
        """Give ``key`` a new TTL only if it still holds ``expected`` (keep an owned lock alive)."""
        item = self._live(self.prefix + key)
        if item is None or item[0] != expected:
            return False
        self._data[self.prefix + key] = (item[0], time.monotonic() + ttl)
        return True

    async def close(self) -> None:
        self._data.clear()
        self._bytes = 0
        self._streams.clear()
        self._records.clear()
        for forget in self._on_close:
            forget()

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [await self.get(k) for k in keys]

    # records: small values that must not be evicted (API keys, budget settings)
    async def put_record(self, key: str, value: bytes) -> None:
        key = self.prefix + key
        if key not in self._records and len(self._records) >= self.max_records:
            raise StoreUnavailable(f"memory store holds its maximum of {self.max_records} records")
        self._records[key] = bytes(value)

    async def get_record(self, key: str) -> bytes | None:
        return self._records.get(self.prefix + key)

    async def get_records(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._records.get(self.prefix + k) for k in keys]

    async def delete_record(self, key: str) -> bool:
        return self._records.pop(self.prefix + key, None) is not None

    def records_now(self, keys: Sequence[str]) -> list[bytes | None]:
        """Records read without awaiting: for an operation that must run in one step of the event
        loop (a reservation checking the settings it was planned with)."""
        return [self._records.get(self.prefix + k) for k in keys]

    def on_close(self, forget) -> None:
        """Have :meth:`close` also call ``forget()`` (state kept alongside, e.g. budget counters)."""
        self._on_close.append(forget)
