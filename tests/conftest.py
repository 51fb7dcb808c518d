"""Shared test fixtures: real processes on free loopback ports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .ports import free_port  # noqa: F401  (shared by the test modules)
from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
#: The passthrough tier's upstream API key in tests/e2e/gateway-e2e.yaml (`api_key_env`), which
#: unit tests load too; services started by the tests inherit it.
STUB_UPSTREAM_KEY = "sk-stub-upstream-key-for-e2e"
os.environ["EXTPROC_E2E_STUB_KEY"] = STUB_UPSTREAM_KEY
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
