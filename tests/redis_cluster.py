"""A real Redis Cluster of a test's own on loopback: 3 masters (and a replica each, optionally).

``redis-server --cluster-enabled yes`` per node on free ports, ``redis-cli --cluster create``,
then waits for ``cluster_state:ok`` on every node. :meth:`RedisCluster.kill` SIGKILLs one node
(a master crash); :meth:`RedisCluster.wait_promoted` waits for its replica to take over.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .ports import free_port


def _command(port: int, *args: str, timeout: float = 2.0) -> str:
    """One command to 127.0.0.1:port as redis-cli would send it; the raw reply, decoded."""
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=timeout)
    return out.stdout


class RedisCluster:
    """``masters`` masters with ``replicas`` replica(s) each, data in ``workdir``.

    :param durable: AOF fsynced on every write on each node (``appendfsync always``).
    :param node_timeout: ``cluster-node-timeout`` in ms: how long a master may be silent before its
        replica is promoted (the failover test's wait is about twice this).
    """

    def __init__(self, workdir: Path, *, masters: int = 3, replicas: int = 0, durable: bool = False,
                 node_timeout: int = 1000):
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                raise FileNotFoundError(f"{tool} is not installed")
        self.workdir, self.masters, self.replicas = Path(workdir), masters, replicas
        self.durable, self.node_timeout = durable, node_timeout
        self.ports = [free_port() for _ in range(masters * (1 + replicas))]
        # the bus port is explicit: the default (port + 10000) fails for ephemeral ports above 55535
        self.bus_ports = {p: free_port() for p in self.ports}
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """The store URL: every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _start_node(self, port: int) -> None:
        d = self.workdir / str(port)
        d.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        self.procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(d), "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
             "--cluster-port", str(self.bus_ports[port]),
             "--cluster-node-timeout", str(self.node_timeout), "--protected-mode", "no",
             "--repl-diskless-sync-delay", "0",  # a replica's first sync at once, not 5 s later
             "--logfile", str(d / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    @staticmethod
    def _answers(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 30) -> "RedisCluster":
        for port in self.ports:
            self._start_node(port)
        deadline = time.monotonic() + timeout
        try:
            for port in self.ports:
                while not self._answers(port):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server on {port} did not start")
                    time.sleep(0.05)
            created = subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=timeout)
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
            self.wait_ok(deadline - time.monotonic())
            self.wait_replicas_synced(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 20, ports=None) -> None:
        """Until every (live) node says ``cluster_state:ok`` and knows every slot's master."""
        deadline = time.monotonic() + timeout
        for port in ports or self.live_ports():
            while "cluster_state:ok" not in _command(port, "cluster", "info"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster is not ok on {port}: {_command(port, 'cluster', 'info')}")
                time.sleep(0.05)

    def wait_replicas_synced(self, timeout: float = 20) -> None:
        """Until every replica's link to its master is up (one that never synced is never promoted)."""
        deadline = time.monotonic() + timeout
        for port in self.live_ports():
            while True:
                info = _command(port, "info", "replication")
                if "role:master" in info or "master_link_status:up" in info:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica {port} did not sync: {info}")
                time.sleep(0.05)

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def masters_now(self) -> list[int]:
        """Ports of the live nodes that are masters."""
        return [p for p in self.live_ports() if "role:master" in _command(p, "info", "replication")]

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot now (as the first live node sees it)."""
        port = self.live_ports()[0]
        slot = int(_command(port, "cluster", "keyslot", key).strip())
        for line in _command(port, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for rng in fields[8:]:
                lo, _, hi = rng.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(fields[1].split("@")[0].rpartition(":")[2])
        raise RuntimeError(f"no master serves {key!r}")

    def kill(self, port: int) -> None:
        """A crash of one node: SIGKILL, no shutdown."""
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)

    def wait_promoted(self, dead: int, timeout: float = 20) -> float:
        """Seconds until a replica of ``dead`` is a master and the cluster is ok again."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            live = self.live_ports()
            if len(self.masters_now()) >= self.masters:
                try:
                    self.wait_ok(max(0.1, deadline - time.monotonic()), live)
                    return time.monotonic() - start
                except RuntimeError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica of {dead} was promoted within {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
