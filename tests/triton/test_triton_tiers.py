"""The reference LLM tiers behind a real tritonserver, through Triton's HTTP generate API."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request

import pytest

TIERS = ["llm-small", "llm-medium", "llm-large"]  # the session fixture in conftest.py loads these


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, str]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def generate(triton, model: str, **body) -> dict:
    status, text = _post(f"{triton.http_url}/v2/models/{model}/generate", body)
    assert status == 200, text
    return json.loads(text)


def generate_stream(triton, model: str, **body) -> list[dict]:
    status, text = _post(f"{triton.http_url}/v2/models/{model}/generate_stream", {"stream": True, **body})
    assert status == 200, text
    events = [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
    assert events, text
    return events


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _metric(triton, name: str, model: str) -> float:
    with urllib.request.urlopen(triton.metrics_url, timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("model", TIERS)
def test_each_tier_answers(triton, model):
    out = generate(triton, model, text_input="Hello, who are you?", max_tokens=6)
    assert out["model_name"] == model
    assert isinstance(out["text_output"], str) and out["text_output"]
    assert out["completion_tokens"] == 6
    assert out["prompt_tokens"] == 6
    assert out["finish_reason"] == "length"


def test_streaming_yields_one_event_per_token(triton):
    events = generate_stream(triton, "llm-small", text_input="Stream please", max_tokens=8)
    assert len(events) == 8
    assert [e["completion_tokens"] for e in events] == list(range(1, 9))
    assert [e["finish_reason"] for e in events] == [""] * 7 + ["length"]
    whole = generate(triton, "llm-small", text_input="Stream please", max_tokens=8)
    assert "".join(e["text_output"] for e in events) == whole["text_output"]


def test_greedy_is_deterministic_and_tiers_differ(triton):
    a = generate(triton, "llm-medium", text_input="Determinism check", max_tokens=12)
    b = generate(triton, "llm-medium", text_input="Determinism check", max_tokens=12, temperature=0.0)
    assert a["text_output"] == b["text_output"]
    c = generate(triton, "llm-small", text_input="Determinism check", max_tokens=12)
    assert c["text_output"] != a["text_output"]


def test_seeded_sampling_and_stop_words(triton):
    body = dict(text_input="Sample me", max_tokens=10, temperature=0.8, top_p=0.9, top_k=40, random_seed=1234)
    assert generate(triton, "llm-small", **body)["text_output"] == generate(triton, "llm-small", **body)["text_output"]
    full = generate(triton, "llm-small", text_input="Stop words", max_tokens=20)["text_output"]
    stop = full[5:9]
    out = generate(triton, "llm-small", text_input="Stop words", max_tokens=20, stop_words=[stop, "never-there"])
    assert out["finish_reason"] == "stop"
    assert out["text_output"] == full[: full.index(stop)]


def test_concurrent_requests_are_batched(triton):
    model = "llm-medium"
    steps0 = _metric(triton, "reference_llm_decode_steps_total", model)
    tokens0 = _metric(triton, "reference_llm_decode_tokens_total", model)
    stats0 = _get_json(f"{triton.http_url}/v2/models/{model}/stats")["model_stats"][0]
    n = 8
    barrier = threading.Barrier(n)
    results: dict[int, dict] = {}

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = generate(triton, model, text_input=f"concurrent {i % 2}", max_tokens=24)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == n
    # batching must not change greedy results
    for i in range(n):
        assert results[i]["text_output"] == results[i % 2]["text_output"]
        assert results[i]["completion_tokens"] == 24

    # The in-flight batcher's own counters (custom metrics on Triton's /metrics): decode steps
    # served several sequences at once.  They are flushed when the engine goes idle.
    deadline = time.monotonic() + 10
    while True:
        steps = _metric(triton, "reference_llm_decode_steps_total", model) - steps0
        tokens = _metric(triton, "reference_llm_decode_tokens_total", model) - tokens0
        if tokens >= n * 23 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert tokens >= n * 23
    assert tokens / steps > 1.5, (tokens, steps)
    assert _metric(triton, "reference_llm_max_decode_batch", model) > 1

    # Triton's own statistics: the dynamic batcher handed requests over in groups, so there were
    # fewer execute() calls than requests and a batch_stats entry with batch_size > 1.
    stats = _get_json(f"{triton.http_url}/v2/models/{model}/stats")["model_stats"][0]
    inferences = stats["inference_count"] - stats0["inference_count"]
    executions = stats["execution_count"] - stats0["execution_count"]
    assert inferences == n
    assert executions < inferences
    assert any(b["batch_size"] > 1 for b in stats["batch_stats"])


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens": 4},                                  # missing text_input
        {"text_input": "x", "max_tokens": 0},               # invalid max_tokens
        {"text_input": "x", "max_tokens": "many"},          # wrong type
        {"text_input": "x", "temperature": -2.0},           # invalid temperature
    ],
)
def test_bad_input_is_an_error_not_a_hang(triton, body):
    t0 = time.monotonic()
    status, text = _post(f"{triton.http_url}/v2/models/llm-small/generate", body, timeout=20)
    # our validation answers 400; Triton's own JSON parsing of a wrongly typed value answers 500
    assert status >= 400, (status, text)
    assert "error" in json.loads(text)
    assert time.monotonic() - t0 < 10


def test_unknown_model_is_not_found(triton):
    status, _ = _post(f"{triton.http_url}/v2/models/llm-huge/generate", {"text_input": "x"})
    assert status in (400, 404)


@pytest.mark.parametrize("model", TIERS)
def test_each_tier_computes_with_its_configured_blas_threads(triton, model):
    """config.pbtxt's ``blas_threads`` (1) is applied in the model's own process, read back from
    its BLAS library and exported as a gauge (unless this environment overrides it)."""
    from reference_llm.blas_threads import blas_thread_limit

    expected = blas_thread_limit("1", model)
    value = _metric(triton, "reference_llm_blas_threads", model)  # set at load, before any traffic
    if expected is None:  # OPENBLAS_NUM_THREADS & co. set here: the library's choice, whatever it is
        assert value >= 1
    else:
        assert value == expected
