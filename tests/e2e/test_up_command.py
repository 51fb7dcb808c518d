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


def test_up_starts_everything_answers_and_stops_cleanly_on_ctrl_c(tmp_path):
    import openai

    listen, admin, extproc, metrics = free_port(), free_port(), free_port(), free_port()
    triton = free_port_run(3)  # HTTP, gRPC and metrics on three consecutive ports
    cmd = [sys.executable, "-m", "extproc", "up", "--work-dir", str(tmp_path), "--listen-port", str(listen),
           "--admin-port", str(admin), "--extproc-port", str(extproc), "--triton-port", str(triton),
           "--workers", "1", "--models", "llm-small", "--metrics-port", str(metrics)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(banner)
        assert "llm-extproc is up" in text, text
        assert f"http://127.0.0.1:{listen}/v1" in text
        assert f"http://127.0.0.1:{metrics}/metrics" in text

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{listen}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="auto", max_tokens=4,
                                               messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped." in out
    # Nothing left behind: no process still has the work dir on its command line.
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert [p for p in leftovers if int(p) != os.getpid()] == []
