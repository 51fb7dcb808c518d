"""A deep queue on one tier spills to another, from real load on real Triton (no fake metrics).

The large CPU tier is limited to one sequence at a time; three long requests make two wait in its
engine; the next `auto` request sees the queue on Triton's /metrics and goes to the medium tier.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import openai
import pytest

from ..conftest import ROOT

pytestmark = pytest.mark.e2e

CONFIG = ROOT / "tests" / "e2e" / "load-spill-e2e.yaml"


@pytest.fixture(scope="module")
def spill_stack(make_stack):
    return make_stack(CONFIG, workers=1, redis=False, models=("llm-medium", "llm-large"),
                       triton_env={"EXTPROC_LLM_MAX_ACTIVE_SEQUENCES_LARGE": "1"})


def waiting(stack, model: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.triton_metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("reference_llm_waiting_requests") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_deep_queue_on_large_spills_to_medium(spill_stack):
    client = openai.OpenAI(base_url=spill_stack.base_url, api_key="unused", max_retries=0, timeout=120)
    idle = client.chat.completions.with_raw_response.create(
        model="auto", max_tokens=2, messages=[{"role": "user", "content": "quiet"}])
    assert idle.headers["x-extproc-tier"] == "large"  # nothing queued: no spill

    def long_request(i):
        client.chat.completions.create(model="large", max_tokens=150,
                                       messages=[{"role": "user", "content": f"long {i}"}])

    threads = [threading.Thread(target=long_request, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while waiting(spill_stack, "llm-large") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert waiting(spill_stack, "llm-large") >= 2  # real queue, reported by the engine
    time.sleep(0.3)  # past load_spill's max_age
    busy = client.chat.completions.with_raw_response.create(
        model="auto", max_tokens=2, messages=[{"role": "user", "content": "while busy"}])
    assert busy.headers["x-extproc-tier"] == "medium"
    assert busy.headers["x-extproc-tier-reason"] == "load_spill"
    assert busy.parse().model == "llm-medium"
    for t in threads:
        t.join(120)
