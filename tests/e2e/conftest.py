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

from extproc.commands.stack import ManagedProcess, Stack, StackPorts, http_ok

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


#: Every stack the session started (their Envoys health-check the Triton they share).
STACKS: list[Stack] = []


def model_requests(triton_http_port: int, model: str = "llm-small") -> int:
    """The requests ``model`` has served, health checks left out.

    Envoy health-checks each tier with a one-token generation of its model, which Triton counts
    as an inference like any other: this is Triton's inference count minus the health checks
    every running Envoy of the session sent to that model, once both have settled (Triton may
    count a decoupled model's request a moment after the client got its last byte).
    """
    import json
    import time
    import urllib.request

    cluster = f"tier_{model.removeprefix('llm-')}"

    def once() -> int:
        url = f"http://127.0.0.1:{triton_http_port}/v2/models/{model}/stats"
        with urllib.request.urlopen(url, timeout=5) as r:
            count = sum(int(m.get("inference_count", 0)) for m in json.loads(r.read())["model_stats"])
        for stack in STACKS:
            if stack.ports.triton_http != triton_http_port or stack.envoy is None or not stack.envoy.alive():
                continue
            url = f"http://127.0.0.1:{stack.ports.admin}/stats?filter=^cluster.{cluster}.health_check.success$"
            with urllib.request.urlopen(url, timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith(f"cluster.{cluster}.health_check.success:"):
                        count -= int(line.rsplit(":", 1)[1])
        return count

    last = once()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.15)
        now = once()
        if now == last:
            return now
        last = now
    return last


@pytest.fixture(scope="session")
def make_stack(tmp_path_factory, redis_url, stub_upstream):
    """Start a whole stack with a given gateway config; stopped at session end."""
    started = STACKS

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
