"""The `extproc` command's small sub-commands: check-config, plugins."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extproc", *args], capture_output=True, text=True, timeout=120)


def test_check_config_on_the_embedded_default():
    result = run("check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("configuration OK: 3 tier(s) (small, medium, large)")
    assert "model_tiers" in result.stdout


def test_check_config_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: {small: {model: m}}\ndefault_tier: small\nserver: {prot: 1}\n")
    result = run("check-config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: server.prot: unknown key" in result.stderr


def test_plugins_lists_built_ins_with_the_hooks_they_implement():
    result = run("plugins")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["model_tiers"]["loaded"] is True
    assert rows["model_tiers"]["target"] == "extproc_plugins.routing.model_tiers:ModelTiers"
    assert "extproc_choose_tier" in rows["model_tiers"]["hooks"]
    assert rows["budgets"]["loaded"] is False  # installed, opt-in


def test_up_worker_sockets_needs_workers(tmp_path):
    result = run("up", "--worker-sockets", "--work-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "--worker-sockets needs --workers N" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_up_refuses_ports_in_use_before_starting_anything(tmp_path):
    # A second `extproc up` used to find the first stack's servers ready on the same ports and
    # print "llm-extproc is up" before its own Envoy failed to bind.
    import socket

    from tests.ports import free_port_run
    from extproc.commands.tritonserver import free_port

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run("up", "--listen-port", str(port), "--work-dir", str(tmp_path / "run"),
                     "--admin-port", str(free_port()), "--extproc-port", str(free_port()),
                     "--triton-port", str(free_port_run(3)), "--metrics-port", str(free_port()))
    assert result.returncode == 2
    assert f"extproc up: already in use on 127.0.0.1: {port} (Envoy listener)." in result.stderr
    assert "Is another `extproc up` running?" in result.stderr and "--listen-port" in result.stderr
    assert "is up" not in result.stdout
    assert not (tmp_path / "run").exists()  # nothing was started


def test_ports_in_use_ignores_free_ports_and_names_taken_ones():
    import socket

    from extproc.commands.stack import ports_in_use
    from extproc.commands.tritonserver import free_port

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        free = free_port()
        assert ports_in_use({"a": free, "b": taken}) == [f"{taken} (b)"]


def test_serve_worker_sockets_option_reaches_the_config():
    import argparse

    from extproc.commands.cli import _overrides

    args = argparse.Namespace(worker_sockets="/run/extproc", workers=2)
    assert _overrides(args)["server"] == {"workers": 2, "worker_sockets": "/run/extproc"}


def test_up_interrupts_once_then_ignores_ctrl_c():
    # A second Ctrl-C must not cut short the cleanup the first one started.
    import os
    import signal

    from extproc.commands.cli import Interrupted, _interrupt_once

    previous = signal.signal(signal.SIGINT, _interrupt_once)
    try:
        with pytest.raises(Interrupted) as caught:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs between bytecodes
                pass
        assert isinstance(caught.value, KeyboardInterrupt)  # every `except KeyboardInterrupt` sees it
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)  # ignored
    finally:
        signal.signal(signal.SIGINT, previous)


def test_finding_triton_does_not_import_pytriton():
    # `extproc up` only needs the folder; importing pytriton loads gevent, zmq and aiohttp.
    import subprocess
    import sys

    code = ("import sys; from extproc.commands.tritonserver import find_tritonserver; "
            "find_tritonserver(); print('pytriton' in sys.modules, 'gevent' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
