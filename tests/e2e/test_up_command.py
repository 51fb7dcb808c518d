"""`extproc up` (what `make up` runs): the whole stack from one command, stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ..conftest import free_port
from ..ports import free_port_run

pytestmark = pytest.mark.e2e


def launch_up(tmp_path, *extra: str) -> tuple[subprocess.Popen, dict]:
    """`extproc up` on free ports with the small tier only (and ``extra`` options), stdout piped;
    returns (process, ports)."""
    ports = {"listen": free_port(), "admin": free_port(), "extproc": free_port(), "metrics": free_port(),
             "triton": free_port_run(3)}  # Triton: HTTP, gRPC and metrics on three consecutive ports
    cmd = [sys.executable, "-m", "extproc", "up", "--work-dir", str(tmp_path), "--listen-port", str(ports["listen"]),
           "--admin-port", str(ports["admin"]), "--extproc-port", str(ports["extproc"]),
           "--triton-port", str(ports["triton"]), "--workers", "1", "--models", "llm-small",
           "--metrics-port", str(ports["metrics"]), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), ports


def start_up(tmp_path, *extra: str) -> tuple[subprocess.Popen, dict, str]:
    """:func:`launch_up`, then its output up to the end of the banner; returns (process, ports, banner)."""
    proc, ports = launch_up(tmp_path, *extra)
    banner = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        banner.append(line)
        if "Ctrl-C stops everything" in line:
            break
    return proc, ports, "".join(banner)


def leftovers(tmp_path, ports: dict) -> list[str]:
    """Processes of that stack still running: Envoy and Triton have the work dir on their command
    line, the service its own port."""
    found = []
    for pattern in (str(tmp_path), f"extproc serve .*--port {ports['extproc']} "):
        out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
        found += [line for line in out.splitlines() if int(line.split()[0]) != os.getpid()]
    return found


def ask(ports: dict) -> None:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['listen']}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="auto", max_tokens=4, messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0


def test_up_starts_everything_answers_and_stops_cleanly_on_ctrl_c(tmp_path):
    proc, ports, banner = start_up(tmp_path)
    try:
        assert "llm-extproc is up" in banner, banner
        assert f"http://127.0.0.1:{ports['listen']}/v1" in banner
        assert f"http://127.0.0.1:{ports['metrics']}/metrics" in banner
        ask(ports)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped." in out
    assert leftovers(tmp_path, ports) == []


def test_banner_says_when_redis_does_not_answer(tmp_path):
    # A wrong --redis URL leaves the stack running on degraded policies: say so where the user looks.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc, ports, banner = start_up(tmp_path, "--redis", dead)
    try:
        assert "llm-extproc is up" in banner, banner
        assert f"state                       {dead}  (UNREACHABLE: ConnectionError;" in banner
        ask(ports)  # still serves
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert leftovers(tmp_path, ports) == []


def test_ctrl_c_stops_everything_when_stdout_is_gone_and_signals_keep_coming(tmp_path):
    # `make up | tee log` and Ctrl-C: the terminal signals the whole group, tee dies first, so
    # `up` writes "stopping ..." into a broken pipe; the pane may close (SIGHUP) and an impatient
    # user presses Ctrl-C again. The shutdown used to end at the broken pipe, leaving the service.
    proc, ports, banner = start_up(tmp_path)
    try:
        assert "llm-extproc is up" in banner, banner
        ask(ports)
    finally:
        proc.stdout.close()  # the reader goes away
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGHUP)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert leftovers(tmp_path, ports) == []


def test_ctrl_c_while_starting_stops_what_was_started(tmp_path):
    proc, ports = launch_up(tmp_path)
    try:
        assert "Triton" in proc.stdout.readline()
        time.sleep(0.5)  # Triton is loading its models: it takes seconds
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # and again, impatiently
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted while starting; stopping ..." in out and "stopped." in out
    assert "Traceback" not in out
    assert leftovers(tmp_path, ports) == []
