"""The whole stack for end-to-end tests: real Triton, real Envoy, the real service, real Redis.

``stack`` is the shared session stack (config ``gateway-e2e.yaml``). Tests that need their own
gateway configuration use ``make_stack(config_path, ...)``; every stack it makes is stopped at
the end of the session. ``make_gateway(stack, config_path)`` adds a second gateway (service +
Envoy) in front of the same Triton and Redis, for cross-instance tests.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from extproc.stack import ManagedProcess, Stack, StackPorts, http_ok

from ..conftest import ROOT, STUB_UPSTREAM_KEY, free_port, require  # noqa: F401 (re-exported)

E2E_CONFIG = ROOT / "tests" / "e2e" / "gateway-e2e.yaml"


@pytest.fixture(scope="session")
def stub_upstream(tmp_path_factory):
    """The OpenAI-compatible stub (benchmarks/stub_upstream.py --echo); yields its port."""
    work = tmp_path_factory.mktemp("stub")
    port = free_port()
    stub = ManagedProcess("stub upstream", [sys.executable, str(ROOT / "benchmarks" / "stub_upstream.py"),
                                             "--port", str(port), "--echo"], work / "stub.log")
    stub.start()
    stub.wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 20, "serving")
    yield port
    stub.stop()


@pytest.fixture(scope="session")
def make_stack(tmp_path_factory, redis_url, stub_upstream):
    """Start a whole stack with a given gateway config; stopped at session end."""
    started: list[Stack] = []

    def make(config_path: Path, *, workers: int = 2, redis: bool = True,
             models: tuple[str, ...] = ("llm-small", "llm-medium", "llm-large"),
             share_triton_with: Stack | None = None, **kwargs) -> Stack:
        """A stack for ``config_path``; ``share_triton_with`` makes only a second gateway
        (service + Envoy) in front of that stack's Triton."""
        work = tmp_path_factory.mktemp("stack")
        ports = StackPorts(0, 0, 0, 0, 0, 0, stub_upstream)
        if share_triton_with is not None:
            other = share_triton_with.ports
            ports = StackPorts(0, 0, 0, other.triton_http, other.triton_grpc, other.triton_metrics, stub_upstream)
            kwargs["with_triton"] = False
        s = Stack(work, ports=ports, config_path=Path(config_path),
                  workers=workers, redis_url=redis_url if redis else None, models=models, **kwargs)
        s.start()
        started.append(s)
        return s

    yield make
    for s in reversed(started):
        s.stop()


@pytest.fixture(scope="session")
def stack(make_stack):
    for module in ("extproc_keyword_guard", "extproc_test_plugins"):
        require(importlib.util.find_spec(module) is not None,
                f"{module} is not installed (make test installs it)")
    return make_stack(E2E_CONFIG)


@pytest.fixture
def client(stack):
    import openai

    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(stack):
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{stack.ports.listen}", timeout=60) as c:
        yield c
