"""Embeddings on Triton (``embeddings.backend: triton``) through real Envoy, Triton and the service.

The stack's Triton loads the ``embedder`` model beside the three tiers (``Stack(embedder=True)``,
what ``extproc up`` does for such a configuration) and the service (2 workers) is pointed at it.
Proof that ``auto`` prompts were embedded by Triton: Triton's own
``nv_inference_request_success{model="embedder"}`` moves, and the gateway's
``extproc_embeddings_total{backend="triton"}`` counts them. When the embedder is unavailable
(unloaded through Triton's repository API: Triton answers "unknown model"):

* ``on_unavailable: local`` (this stack): the prompts are embedded in the workers, counted
  ``local_fallback``, the requests are served and routed as before, nothing degraded;
* ``on_unavailable: fail`` (a second gateway on the same Triton): the embedding routers fail, their
  ``fail_open`` lets the request through to the default tier, flagged ``x-extproc-degraded``.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from ..conftest import free_port

pytestmark = pytest.mark.e2e

CONFIG = {
    "server": {"workers": 2, "grace_seconds": 2},
    "tiers": {
        "small": {"model": "llm-small", "aliases": ["llm-small"], "default_max_tokens": 2,
                  "price": {"prompt_per_1k": 0.0001, "completion_per_1k": 0.0002}},
        "medium": {"model": "llm-medium", "aliases": ["llm-medium"], "default_max_tokens": 2,
                   "price": {"prompt_per_1k": 0.0005, "completion_per_1k": 0.0015}},
        "large": {"model": "llm-large", "aliases": ["llm-large"], "default_max_tokens": 2,
                  "price": {"prompt_per_1k": 0.003, "completion_per_1k": 0.006}},
    },
    "default_tier": "small",
    "plugins": [
        {"name": "route_rules"},
        {"name": "semantic_routes", "on_error": "fail_open"},
        {"name": "learned_router", "on_error": "fail_open"},
        {"name": "model_tiers"},
        {"name": "metrics", "on_error": "fail_open"},
    ],
    "embeddings": {"backend": "triton", "timeout_seconds": 5, "on_unavailable": "local", "retry_seconds": 0.5},
}

PROMPTS = [
    "What is the boiling point of water at the top of Mont Blanc?",
    "Draft a polite note asking my landlord to fix the heating this week.",
    "Prove that every planar graph can be coloured with five colours.",
    "Name a fruit that is yellow.",
]


def write(tmp: Path, name: str, **embeddings) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["embeddings"].update(embeddings)
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def triton_stack(make_stack, tmp_path_factory):
    path = write(tmp_path_factory.mktemp("embeddings"), "triton-embeddings.yaml")
    return make_stack(path, embedder=True, metrics_port=free_port())


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def counter(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def embedder_successes(stack) -> float:
    return counter(get(f"http://127.0.0.1:{stack.ports.triton_metrics}/metrics"),
                   "nv_inference_request_success", model="embedder")


def gateway_embeddings(stack, backend: str) -> float:
    return counter(get(f"http://127.0.0.1:{stack.metrics_port}/metrics"), "extproc_embeddings_total", backend=backend)


def ask(stack, prompt: str) -> tuple[int, dict]:
    body = json.dumps({"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{stack.ports.listen}/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items()}


def repository(stack, action: str) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{stack.ports.triton_http}/v2/repository/models/embedder/{action}",
                                 data=b"{}", method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200


def settled(read, want, timeout: float = 10.0):
    """``read()`` once it satisfies ``want`` (metrics are scraped, Triton's counted a moment after)."""
    deadline = time.monotonic() + timeout
    value = read()
    while not want(value) and time.monotonic() < deadline:
        time.sleep(0.2)
        value = read()
    return value


def test_auto_prompts_are_embedded_by_triton(triton_stack):
    assert "embedder" in triton_stack.triton_models_loaded()
    before_triton, before_gateway = embedder_successes(triton_stack), gateway_embeddings(triton_stack, "triton")
    tag = time.time_ns()
    for prompt in PROMPTS:
        status, headers = ask(triton_stack, f"{prompt} ({tag})")
        assert status == 200
        assert headers["x-extproc-tier-reason"].split(":")[0] in ("semantic_routes", "learned_router")
        assert "x-extproc-degraded" not in headers
    n = len(PROMPTS)
    assert settled(lambda: embedder_successes(triton_stack), lambda v: v >= before_triton + n) >= before_triton + n
    assert settled(lambda: gateway_embeddings(triton_stack, "triton"),
                   lambda v: v == before_gateway + n) == before_gateway + n
    assert gateway_embeddings(triton_stack, "local") == 0
    assert gateway_embeddings(triton_stack, "local_fallback") == 0


def test_embedder_unavailable_falls_back_in_process_then_returns_to_triton(triton_stack):
    repository(triton_stack, "unload")
    try:
        before_triton = embedder_successes(triton_stack)
        before_fallback = gateway_embeddings(triton_stack, "local_fallback")
        tag = time.time_ns()
        for prompt in PROMPTS:
            status, headers = ask(triton_stack, f"{prompt} (fallback {tag})")
            assert status == 200 and "x-extproc-degraded" not in headers
            assert headers["x-extproc-tier-reason"].split(":")[0] in ("semantic_routes", "learned_router")
        assert settled(lambda: gateway_embeddings(triton_stack, "local_fallback"),
                       lambda v: v == before_fallback + len(PROMPTS)) == before_fallback + len(PROMPTS)
        assert embedder_successes(triton_stack) == before_triton
    finally:
        repository(triton_stack, "load")
    time.sleep(1.0)  # retry_seconds 0.5: the next batch asks Triton again
    before = gateway_embeddings(triton_stack, "triton")
    assert ask(triton_stack, f"{PROMPTS[0]} (back {time.time_ns()})")[0] == 200
    assert settled(lambda: gateway_embeddings(triton_stack, "triton"), lambda v: v == before + 1) == before + 1


def test_fail_policy_fails_the_routing_step_as_configured(make_stack, triton_stack, tmp_path):
    """A gateway with ``on_unavailable: fail``: the routers' ``fail_open`` takes over."""
    gateway = make_stack(write(tmp_path, "fail.yaml", on_unavailable="fail"), embedder=True,
                         share_triton_with=triton_stack, metrics_port=free_port())
    status, headers = ask(gateway, f"{PROMPTS[2]} (fail policy, up {time.time_ns()})")
    assert status == 200 and "x-extproc-degraded" not in headers
    repository(triton_stack, "unload")
    try:
        status, headers = ask(gateway, f"{PROMPTS[2]} (fail policy, down {time.time_ns()})")
        assert status == 200
        assert set(headers["x-extproc-degraded"].split(",")) == {"semantic_routes", "learned_router"}
        assert headers["x-extproc-tier"] == "small"  # no router decided: model_tiers' default
        assert gateway_embeddings(gateway, "local_fallback") == 0
    finally:
        repository(triton_stack, "load")
