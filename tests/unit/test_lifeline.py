"""Processes that die with their parent (extproc.serving.lifeline)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from extproc.serving.lifeline import dying_with_parent, group_leader


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# A parent that starts `cmd` (as the stack does), prints the child's pid, then waits to be killed.
_PARENT = """
import subprocess, sys, time
from extproc.serving.lifeline import dying_with_parent, group_leader
wrap = {"pdeathsig": dying_with_parent, "group": group_leader}[sys.argv[1]]
child = subprocess.Popen(wrap(["sh", "-c", "sleep 300 & echo $!; wait"]), stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(300)
"""


def _start(kind: str) -> tuple[subprocess.Popen, int, int]:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, kind], stdout=subprocess.PIPE, text=True)
    child, grandchild = map(int, parent.stdout.readline().split())
    return parent, child, grandchild


def test_a_binary_started_through_setpriv_dies_with_a_killed_parent():
    parent, child, grandchild = _start("pdeathsig")
    parent.kill()
    parent.wait(5)
    assert _until(lambda: not _alive(child)), "the child outlived its SIGKILLed parent"
    os.kill(grandchild, signal.SIGKILL)  # pdeathsig reaches the child only, not what it started


def test_a_group_leader_takes_what_it_started_when_its_parent_dies():
    parent, child, grandchild = _start("group")
    parent.kill()
    parent.wait(5)
    assert _until(lambda: not _alive(child) and not _alive(grandchild)), "something outlived the parent"


def test_a_group_leader_ends_as_its_command_did_and_leaves_nothing():
    assert subprocess.run(group_leader(["sh", "-c", "exit 3"])).returncode == 3
    assert subprocess.run(group_leader(["sh", "-c", "kill -TERM $$"])).returncode == -signal.SIGTERM
    out = subprocess.run(group_leader(["sh", "-c", "sleep 300 & echo $!"]), capture_output=True, text=True)
    assert out.returncode == 0 and _until(lambda: not _alive(int(out.stdout)))


def test_a_group_leader_passes_sigterm_on():
    proc = subprocess.Popen(group_leader(["sh", "-c", "trap 'exit 7' TERM; sleep 300 & wait"]),
                            start_new_session=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 7


def test_without_setpriv_the_command_is_unchanged(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert dying_with_parent(["envoy", "-c", "x"]) == ["envoy", "-c", "x"]


def test_the_command_of_a_killed_group_leader_is_stopped_too():
    parent, child, grandchild = _start("group")
    try:
        os.kill(child, signal.SIGKILL)  # the leader itself, outright: its command gets SIGTERM
        assert _until(lambda: not _alive(grandchild) or _sh_of(grandchild) is None)
    finally:
        if _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
        parent.kill()
        parent.wait(5)


def _sh_of(pid: int) -> int | None:
    """The shell that started ``pid`` while it is still alive, else None."""
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().split()[3])
    except OSError:
        return None
    return ppid if ppid != 1 and _alive(ppid) else None
