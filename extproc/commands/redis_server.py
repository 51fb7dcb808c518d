"""A local Redis server for the stack: the shared state every worker (and gateway) of ``extproc up`` uses.

Started by ``extproc up`` unless ``--redis URL``, ``--state memory`` or the config's
``state.redis_url`` says otherwise. It listens on a Unix socket in the work dir (no TCP port to
collide with another stack), appends every write to its AOF (``appendfsync everysec``: a crash
loses at most about a second of budget spend, and a restart finds the counters again) and never
evicts (``noeviction``: budget counters and API keys must not be dropped to make room for cached
answers; when ``maxmemory`` is reached, writes fail and the caches degrade to misses).

The binary is Debian's ``redis-server`` package (``scripts/ensure-debs.sh redis-server``, run by
``make install`` when none is on the PATH): the distribution's build, kept up to date by its
security team, rather than a binary vendored in a wheel.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from extproc.commands.tritonserver import free_port

#: Unix socket paths longer than this do not fit ``sockaddr_un`` (108 bytes with the NUL): TCP then.
MAX_SOCKET_PATH = 100


def redis_server_binary() -> str:
    """The ``redis-server`` on the PATH; RuntimeError with the install hint when there is none."""
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server not found: install it with `scripts/ensure-debs.sh redis-server` "
                           "(make install does), or run with --state memory (per-worker state) "
                           "or --redis URL (a Redis of your own)")
    return found


def redis_server_command(directory: Path, maxmemory: str = "512mb") -> tuple[list[str], str]:
    """The command line of the stack's Redis and the URL clients use: ``(cmd, url)``."""
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / "redis.sock"
    cmd = [redis_server_binary(), "--dir", str(directory), "--appendonly", "yes", "--appendfsync", "everysec",
           "--save", "", "--maxmemory", maxmemory, "--maxmemory-policy", "noeviction",
           "--daemonize", "no", "--loglevel", "warning"]
    if len(str(sock)) <= MAX_SOCKET_PATH:
        cmd += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
        return cmd, f"unix://{sock}"
    port = free_port()
    cmd += ["--port", str(port), "--bind", "127.0.0.1"]
    return cmd, f"redis://127.0.0.1:{port}/0"


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    """Whether the Redis at ``url`` answers PING (a raw socket: no client library needed)."""
    try:
        if url.startswith("unix://"):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(timeout)
            conn.connect(url[len("unix://"):])
        else:
            host_port = url.split("://", 1)[1].split("/", 1)[0]
            host, _, port = host_port.rpartition(":")
            conn = socket.create_connection((host, int(port)), timeout=timeout)
        with conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False
