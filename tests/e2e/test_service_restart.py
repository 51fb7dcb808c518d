"""The ext_proc service stopping and coming back under Envoy: clients never hang.

Runs last in the e2e folder (file name order) because it restarts the shared service.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from extproc.commands.stack import grpc_serving

pytestmark = pytest.mark.e2e

BODY = {"model": "small", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}


def test_sigterm_drains_in_flight_streams_then_restart_serves_again(stack, http):
    # A long stream is in flight when the service is told to stop ...
    result = {}

    def long_stream():
        body = {"model": "large", "stream": True, "max_tokens": 120,
                "messages": [{"role": "user", "content": "a long answer please"}]}
        with httpx.Client(base_url=f"http://127.0.0.1:{stack.ports.listen}", timeout=60) as c:
            r = c.post("/v1/chat/completions", json=body)
            result["status"], result["text"] = r.status_code, r.text

    t = threading.Thread(target=long_stream)
    t.start()
    time.sleep(0.5)
    started = time.monotonic()
    stack.service.proc.send_signal(15)  # SIGTERM
    # ... it finishes (drained, not cut) ...
    t.join(60)
    assert result["status"] == 200
    assert result["text"].rstrip().endswith("data: [DONE]")
    assert stack.service.proc.wait(30) == 0  # clean exit after draining

    # ... while it is down, clients get a quick OpenAI-style error, not a hang ...
    t0 = time.monotonic()
    r = http.post("/v1/chat/completions", json=BODY)
    assert time.monotonic() - t0 < 5
    assert r.status_code >= 500
    assert "error" in r.json()

    # ... and once it is back, traffic flows again.
    stack.start_service()
    assert grpc_serving(stack.ports.extproc)
    deadline = time.monotonic() + 30
    while True:
        r = http.post("/v1/chat/completions", json=BODY)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < 90
