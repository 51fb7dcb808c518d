"""``server.worker_sockets``: a Unix socket per service worker, each an endpoint of Envoy's extproc
cluster. Envoy then spreads the ext_proc streams over every worker itself (with one SO_REUSEPORT
port the kernel places each of Envoy's few connections, often all on one worker); the service
restarting under Envoy on the same socket paths must not hang clients."""

from __future__ import annotations

import time
import urllib.request

import httpx
import pytest

from .conftest import E2E_CONFIG

pytestmark = pytest.mark.e2e

STUB = {"model": "stub", "messages": [{"role": "user", "content": "hi"}]}
TRITON = {"model": "small", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}


def _extproc_hosts(stack) -> dict[str, dict[str, str]]:
    """Envoy's view of every extproc endpoint: {path: {stat: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.admin}/clusters", timeout=2) as r:
        text = r.read().decode()
    hosts: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "extproc" and parts[1].startswith("/"):  # a pipe endpoint
            hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
    return hosts


def _wait_all_healthy(stack, n: int) -> dict[str, dict[str, str]]:
    deadline = time.monotonic() + 30
    while True:
        hosts = _extproc_hosts(stack)
        if len(hosts) == n and all(h.get("health_flags") == "healthy" for h in hosts.values()):
            return hosts
        assert time.monotonic() < deadline, hosts
        time.sleep(0.2)


@pytest.fixture(scope="module")
def socket_stack(make_stack, stack):
    return make_stack(E2E_CONFIG, share_triton_with=stack, worker_sockets=True, workers=2)


def test_every_worker_socket_is_an_endpoint_and_gets_streams(socket_stack):
    hosts = _wait_all_healthy(socket_stack, 2)
    assert sorted(hosts) == sorted(str(socket_stack.socket_dir / f"extproc-{i}.sock") for i in range(2))
    with httpx.Client(base_url=f"http://127.0.0.1:{socket_stack.ports.listen}", timeout=60) as c:
        for _ in range(10):
            r = c.post("/v1/chat/completions", json=STUB)
            assert r.status_code == 200, r.text
            assert r.json()["object"] == "chat.completion"
        r = c.post("/v1/chat/completions", json=TRITON)
        assert r.status_code == 200 and r.json()["model"] == "llm-small", r.text
        r = c.post("/v1/chat/completions", json={**TRITON, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    streams = {path: int(h.get("rq_total", "0")) for path, h in _extproc_hosts(socket_stack).items()}
    assert all(n >= 3 for n in streams.values()), streams  # round robin: each worker got its share


def test_service_restart_on_the_same_sockets_serves_again(socket_stack):
    _wait_all_healthy(socket_stack, 2)
    with httpx.Client(base_url=f"http://127.0.0.1:{socket_stack.ports.listen}", timeout=60) as c:
        assert c.post("/v1/chat/completions", json=STUB).status_code == 200
        socket_stack.stop_service()
        assert not any((socket_stack.socket_dir / f"extproc-{i}.sock").exists() for i in range(2))
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json=STUB)
        assert time.monotonic() - t0 < 5  # a quick OpenAI-style error, not a hang
        assert r.status_code >= 500 and "error" in r.json()
        socket_stack.start_service()
        deadline = time.monotonic() + 30
        while True:
            r = c.post("/v1/chat/completions", json=STUB)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
    _wait_all_healthy(socket_stack, 2)
