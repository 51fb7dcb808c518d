"""Shared test fixtures: real processes on free loopback ports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .ports import free_port  # noqa: F401  (shared by the test modules)
from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, why: str) -> None:
    """Skip locally when a dependency is missing; under CI, fail loudly instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required for this test and missing under CI: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server of our own on a free port (the machine's 6379 is left alone)."""
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()
