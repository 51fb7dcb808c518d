"""The whole stack for end-to-end tests: real Triton, real Envoy, the real service, real Redis."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from extproc.stack import ManagedProcess, Stack, StackPorts, http_ok

from ..conftest import ROOT, free_port, require

E2E_CONFIG = ROOT / "tests" / "e2e" / "gateway-e2e.yaml"


@pytest.fixture(scope="session")
def stack(tmp_path_factory, redis_url):
    for module in ("extproc_keyword_guard", "extproc_test_plugins"):
        require(importlib.util.find_spec(module) is not None,
                f"{module} is not installed (make test installs it)")
    work = tmp_path_factory.mktemp("stack")
    stub_port = free_port()
    stub = ManagedProcess("stub upstream", [sys.executable, str(ROOT / "benchmarks" / "stub_upstream.py"),
                                             "--port", str(stub_port), "--echo"], work / "logs" / "stub.log")
    stub.start()
    stub.wait_until(lambda: http_ok(f"http://127.0.0.1:{stub_port}/health"), 20, "serving")
    s = Stack(work, ports=StackPorts(0, 0, 0, 0, 0, 0, stub_port), config_path=E2E_CONFIG,
              workers=2, redis_url=redis_url)
    s.start()
    yield s
    s.stop()
    stub.stop()


@pytest.fixture
def client(stack):
    import openai

    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(stack):
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{stack.ports.listen}", timeout=60) as c:
        yield c
