"""Processes that die with their parent, whatever kills the parent (SIGKILL included).

A supervisor that is killed cannot stop its children, so each child asks the kernel to do it:
``prctl(PR_SET_PDEATHSIG)`` sends the child a signal when the thread that started it ends. Our
own Python children call :func:`die_with_parent` first thing; binaries (Envoy, Triton, Redis) are
started through util-linux's ``setpriv --pdeathsig`` (:func:`dying_with_parent`), which sets it
and then execs the binary (the setting survives ``execve``). Linux only; elsewhere both do nothing.

The kernel sends the signal when the *thread* that started the child ends, not only the process:
start such children from a thread that lives as long as the supervisor (ours: the main thread).
That is also why Triton's model processes cannot be started this way (Triton forks them from a
model-loading thread that ends after the load): Triton runs under :func:`main` instead
(:func:`group_leader`), which takes its whole process group down when it ends or its parent dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import sys

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies; True when it was set.

    :param parent_pid: the parent this process was started by; if it is already gone (it died
        before this call could be made), exit at once instead of living on as an orphan.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
    return True


def dying_with_parent(cmd: list[str], sig: str = "KILL") -> list[str]:
    """``cmd`` started through ``setpriv --pdeathsig``: it gets ``sig`` when the process that
    started it dies. Without ``setpriv`` (not Linux, no util-linux) ``cmd`` unchanged, with a
    warning: its children could then outlive a killed supervisor."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("setpriv (util-linux) not found: %s will not die with its parent", os.path.basename(cmd[0]))
        return list(cmd)
    return [setpriv, f"--pdeathsig={sig}", "--", *cmd]


def group_leader(cmd: list[str], grace: float = 20.0) -> list[str]:
    """``cmd`` run under :func:`main`: when it ends, or when the process that started it dies,
    nothing it started is left (for servers whose own children are not started from a lasting
    thread, such as Triton's model processes)."""
    return [sys.executable, "-m", "extproc.serving.lifeline", "--parent", str(os.getpid()),
            "--grace", str(grace), "--", *cmd]


def main(argv: list[str] | None = None) -> int:
    """Run a command, then take its process group down with it.

    It leads a process group of its own (``start_new_session``, or it makes one). SIGTERM, SIGINT or
    SIGHUP, and the death of ``--parent`` (``PR_SET_PDEATHSIG``: SIGTERM), are passed to the
    command as SIGTERM; it has ``--grace`` seconds to end. Whenever it ends, whatever else is in
    the group (processes it started) gets SIGKILL, and this process ends as the command did (the
    same exit code, or killed by the same signal).
    """
    import argparse
    import subprocess
    import time

    parser = argparse.ArgumentParser(prog="python -m extproc.serving.lifeline")
    parser.add_argument("--parent", type=int)
    parser.add_argument("--grace", type=float, default=20.0)
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    asked: list[int] = []

    def stop(signum, _frame):
        asked.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    die_with_parent(args.parent, signal.SIGTERM)
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # a group of its own: the rest of the group is then only what the command started
    child = subprocess.Popen(dying_with_parent(cmd, "TERM"))  # and should this process be SIGKILLed
    forwarded_at = None
    while child.poll() is None:
        if asked and forwarded_at is None:
            child.send_signal(signal.SIGTERM)
            forwarded_at = time.monotonic()
        if forwarded_at is not None and time.monotonic() - forwarded_at > args.grace:
            child.kill()
        try:
            child.wait(0.2)
        except subprocess.TimeoutExpired:
            pass
    _kill_rest_of_group()
    code = child.returncode
    if code < 0:  # end the way the command ended
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _kill_rest_of_group() -> None:
    """SIGKILL every other process of this process group (what the command left behind)."""
    me, group = os.getpid(), os.getpgrp()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.getpgid(int(entry)) == group:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


if __name__ == "__main__":
    raise SystemExit(main())
