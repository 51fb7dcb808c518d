"""API keys: issue, look up and revoke keys that map a bearer token to a tenant (and a workflow).

Only a keyed hash of each key is stored: ``HMAC-SHA256(pepper, key)``, hex. The pepper is a
server-side secret (an environment variable or a file, never the store), so a copy of the store
(a Redis dump, a backup) neither reveals keys nor lets anyone test guesses offline. A key is shown
once, when it is created: ``sk-ext-<id>-<secret>``; ``<id>`` (12 hex digits) names it in logs,
the admin API and usage records, and ``<secret>`` is 256 random bits.

Records (never evicted, see :mod:`extproc.state.store`): ``apikey:h:<hash>`` holds the key's JSON record,
``apikey:id:<id>`` its hash (to revoke by id). Keys may also be listed in the configuration by
hash (``extproc admin hash-key`` prints one).

Lookups are cached in the process for ``cache_seconds`` (default 5 s; unknown keys 1 s), so a
revoked key stops working on every worker and gateway within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from extproc import environment
from extproc.state.store import Store

KEY_PREFIX = "sk-ext-"


class PepperMissing(RuntimeError):
    """No pepper configured: keys cannot be hashed."""


def load_pepper(env: str | None = "EXTPROC_KEY_PEPPER", file: str | None = None) -> bytes:
    """The server-side pepper, from ``file`` if given, else the environment variable ``env``."""
    if file:
        value = Path(file).read_bytes().strip()
    else:
        value = environment.named(env).encode()
    if len(value) < 16:
        where = f"file {file}" if file else f"${env}"
        raise PepperMissing(f"API key pepper missing or shorter than 16 bytes ({where}); "
                            f"generate one with: python -c 'import secrets; print(secrets.token_hex(32))'")
    return value


def hash_key(pepper: bytes, key: str) -> str:
    """The stored form of a key: HMAC-SHA256 with the pepper, hex."""
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


@dataclass(slots=True)
class KeyRecord:
    """What a key stands for."""

    id: str
    tenant: str
    workflow: str | None = None
    name: str = ""
    created: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "KeyRecord":
        d = json.loads(data)
        return cls(id=d["id"], tenant=d["tenant"], workflow=d.get("workflow"), name=d.get("name", ""),
                   created=d.get("created", 0.0))


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key (for messages), or None."""
    if key.startswith(KEY_PREFIX):
        rest = key[len(KEY_PREFIX):]
        if len(rest) > 13 and rest[12] == "-":
            return rest[:12]
    return None


class KeyRing:
    """Keys on the store (plus any listed in the configuration), with a short in-process cache."""

    def __init__(self, store: Store, pepper: bytes, *, configured: dict[str, KeyRecord] | None = None,
                 cache_seconds: float = 5.0, cache_size: int = 10_000):
        self.store = store
        self.pepper = pepper
        self.configured = dict(configured or {})  # hash -> record
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        self._cache: dict[str, tuple[KeyRecord | None, float]] = {}

    def hash(self, key: str) -> str:
        return hash_key(self.pepper, key)

    async def create(self, tenant: str, workflow: str | None = None, name: str = "") -> tuple[KeyRecord, str]:
        """A new key for ``tenant``: its record and the key itself (shown once, never stored)."""
        if not tenant:
            raise ValueError("a key needs a tenant")
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
        record = KeyRecord(key_id, tenant, workflow or None, name, time.time())
        digest = self.hash(key)
        await self.store.put_record(f"apikey:h:{digest}", record.to_json())
        await self.store.put_record(f"apikey:id:{key_id}", digest.encode())
        return record, key

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key by id; False when there is no such key."""
        digest = await self.store.get_record(f"apikey:id:{key_id}")
        if digest is None:
            return False
        await self.store.delete_record(f"apikey:h:{digest.decode()}")
        await self.store.delete_record(f"apikey:id:{key_id}")
        self._cache.pop(digest.decode(), None)
        return True

    async def get(self, key_id: str) -> KeyRecord | None:
        digest = await self.store.get_record(f"apikey:id:{key_id}")
        if digest is None:
            return None
        raw = await self.store.get_record(f"apikey:h:{digest.decode()}")
        return KeyRecord.from_json(raw) if raw else None

    async def lookup(self, key: str) -> KeyRecord | None:
        """The record of a presented key, or None for an unknown (or revoked) key."""
        digest = self.hash(key)
        record = self.configured.get(digest)
        if record is not None:
            return record
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        raw = await self.store.get_record(f"apikey:h:{digest}")
        record = KeyRecord.from_json(raw) if raw else None
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        ttl = self.cache_seconds if record is not None else min(1.0, self.cache_seconds)
        if ttl > 0:
            self._cache[digest] = (record, now + ttl)
        return record
