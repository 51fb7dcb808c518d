"""Fixtures for unit tests."""

from __future__ import annotations

import uuid

import pytest

from extproc.state.memory import MemoryStore
from extproc.state.redis_store import RedisStore


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    """The same store test runs on the memory store and on a real Redis (own key prefix)."""
    if request.param == "memory":
        s = MemoryStore(prefix="t:")
    else:
        s = RedisStore(request.getfixturevalue("redis_url"), prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield s
    await s.close()
