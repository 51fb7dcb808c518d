"""`extproc up` keeps the stack whole: state shared by every worker, parts restarted, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

import httpx
import pytest

from .test_up_command import leftovers, start_up

pytestmark = pytest.mark.e2e


def chat(ports: dict, content: str, timeout: float = 30.0) -> httpx.Response:
    """One deterministic chat request on a new connection (Envoy may give it to any worker)."""
    with httpx.Client(timeout=timeout) as client:
        return client.post(f"http://127.0.0.1:{ports['listen']}/v1/chat/completions",
                           headers={"connection": "close"},
                           json={"model": "small", "temperature": 0, "max_tokens": 4,
                                 "messages": [{"role": "user", "content": content}]})


def children_of(pid: int) -> set[int]:
    try:
        return {int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()}
    except OSError:
        return set()


def pgrep(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def service_pid(ports: dict) -> int:
    """The `extproc serve` parent of this stack (found by its port)."""
    out = pgrep(f"extproc serve .*--port {ports['extproc']} ")
    assert len(out) == 1, out
    return int(out[0])


def said(proc) -> str:
    """The next thing `extproc up` says (blank lines skipped)."""
    while True:
        line = proc.stdout.readline()
        if not line or line.strip():
            return line


def until(predicate, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def test_the_same_request_twice_is_a_hit_on_every_worker_and_budgets_start(tmp_path):
    # The embedded default's caches plus budgets, two workers, no per_worker_limits: the stack's
    # own Redis makes them one.
    from importlib import resources

    import yaml

    default = yaml.safe_load((resources.files("extproc.framework") / "default_config.yaml").read_text())
    default["plugins"] = yaml.safe_load(textwrap.dedent("""
        - name: model_tiers
        - name: budgets
          settings: {tenants: {anonymous: {requests_per_day: 1000}}}
        - name: exact_cache
          settings: {ttl: {default_seconds: 3600}}
        - name: metrics
    """))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(default))
    proc, ports, banner = start_up(tmp_path, "--workers", "2", "--config", str(config))
    try:
        assert "llm-extproc is up" in banner, banner
        assert "the stack's own Redis" in banner
        first = chat(ports, "the same question, twice")
        assert first.status_code == 200 and first.headers["x-extproc-cache"] == "miss", first.text
        seen = [chat(ports, "the same question, twice").headers.get("x-extproc-cache") for _ in range(12)]
        assert seen == ["hit"] * 12
        assert len(children_of(service_pid(ports)) - {0}) >= 2  # both workers alive
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert leftovers(tmp_path, ports) == []


def test_sigkill_of_up_leaves_no_process_behind(tmp_path):
    proc, ports, banner = start_up(tmp_path)
    assert "llm-extproc is up" in banner, banner
    assert chat(ports, "hello").status_code == 200
    proc.kill()
    proc.wait(timeout=10)
    assert until(lambda: leftovers(tmp_path, ports) == [], 15), leftovers(tmp_path, ports)


def test_a_killed_service_and_a_killed_triton_are_restarted(tmp_path):
    proc, ports, banner = start_up(tmp_path)
    try:
        assert "llm-extproc is up" in banner, banner
        assert chat(ports, "before").status_code == 200
        os.kill(service_pid(ports), signal.SIGKILL)
        assert "extproc service exited (code -9)" in said(proc)
        assert "extproc service restarted" in said(proc)
        assert until(lambda: chat(ports, "after the service").status_code == 200, 60)
        triton = int(pgrep(f"^[^ ]*/bin/tritonserver .*{tmp_path}")[0])
        os.kill(triton, signal.SIGKILL)
        failed = chat(ports, "Triton is down")
        assert failed.status_code in (502, 503) and "error" in failed.json()  # fast JSON, no hang
        assert "Triton exited (code -9)" in said(proc)
        assert "Triton restarted" in said(proc)
        assert until(lambda: chat(ports, "after Triton").status_code == 200, 120)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert leftovers(tmp_path, ports) == []


def test_a_dead_model_process_is_a_503_then_reloaded(tmp_path):
    proc, ports, banner = start_up(tmp_path)
    heard = Heard(proc)
    try:
        assert "llm-extproc is up" in banner, banner
        assert chat(ports, "before").status_code == 200
        stub = pgrep(f"{tmp_path}/triton/backends/python/triton_python_backend_stub .*llm-small")
        assert len(stub) == 1, stub
        os.kill(int(stub[0]), signal.SIGKILL)
        statuses = set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "reloading" not in heard.text():
            r = chat(ports, "while it is down", timeout=10)
            statuses.add(r.status_code)
            if r.status_code != 200:
                assert r.json()["error"]["type"] == "server_error", r.text  # OpenAI-style, retryable
        assert statuses <= {200, 503}, statuses  # never a 400: the client did nothing wrong
        assert 503 in statuses
        assert until(lambda: chat(ports, "after the reload").status_code == 200, 60)
        # The model can answer a moment before `up` says so (it prints at its next look, ~1 s).
        until(lambda: "llm-small reloaded" in heard.text(), 30)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    out = heard.text(wait=10)
    assert "llm-small fails its health check" in out and "llm-small reloaded" in out, out
    assert proc.returncode == 0
    assert leftovers(tmp_path, ports) == []


class Heard:
    """Everything `extproc up` says from now on, read by a thread as it comes.

    (A ``select`` on the pipe before ``readline`` misses lines that arrived together: the first
    ``readline`` pulls both into the text buffer, where ``select`` cannot see the second and
    ``communicate`` never reads it. CI lost "llm-small reloaded" that way.)"""

    def __init__(self, proc):
        import threading

        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            self._lines.append(line)

    def text(self, wait: float = 0.0) -> str:
        """What was said so far (after waiting up to ``wait`` seconds for the output to end)."""
        if wait:
            self._reader.join(wait)
        return "".join(self._lines)
