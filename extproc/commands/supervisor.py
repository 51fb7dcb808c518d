"""Keeping the local stack up: a part that dies (Redis, Triton, the service, Envoy) is restarted.

``extproc up`` calls :meth:`Supervisor.check` twice a second. A dead part is restarted after a
back-off that doubles while restarts keep dying quickly (from :data:`RESTART_DELAY` to
:data:`RESTART_DELAY_MAX`), and every step is said (the lines :meth:`check` returns). Restarts do
not wait for readiness: Envoy's health checks (Triton tiers) and its retries (the ext_proc
cluster) take a part back once it answers, so one slow start never holds up the others.

A model whose process died leaves Triton running and "ready"; Envoy's health check of its tier
(a one-token generation) fails instead. :class:`ModelWatch` sees that tier fail while Triton is
up and reloads the model (unload, then load: a load of a loaded model does nothing), in the
background, at most once per :data:`RELOAD_EVERY` seconds per model, once Triton has been ready
for :data:`READY_SETTLE` seconds.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable

#: A part that dies within this many seconds of a (re)start counts as a quick failure.
QUICK_FAILURE_SECONDS = 30.0
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
#: A model is reloaded at most this often, and only once Triton has been ready this long.
RELOAD_EVERY = 30.0
READY_SETTLE = 3.0


@dataclass
class _Part:
    name: str
    alive: Callable[[], bool]
    exit_code: Callable[[], int | None]
    restart: Callable[[], None]  #: clean up what is left of the dead one and start a new one
    started: float
    quick_failures: int = 0
    due: float | None = None  #: when the pending restart happens (monotonic)
    restarts: int = 0


class Supervisor:
    """Restarts the parts of a started :class:`~extproc.commands.stack.Stack` that die."""

    def __init__(self, stack, models_by_cluster: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stack, self.clock = stack, clock
        self.parts: list[_Part] = []
        now = clock()
        if stack.redis is not None:
            self._watch(stack.redis.name, stack.redis, now)
        if stack.triton is not None:
            triton = stack.triton

            def restart_triton():
                triton.stop(timeout=5)  # kills what is left of its process group (model processes)
                triton.start()

            self.parts.append(_Part("Triton", triton.alive, lambda: triton.returncode, restart_triton, now))
        for proc in (stack.service, stack.envoy):
            if proc is not None:
                self._watch(proc.name, proc, now)
        self.models = ModelWatch(stack, models_by_cluster or {}, clock) if stack.triton and models_by_cluster else None

    def _watch(self, name: str, proc, now: float) -> None:
        def restart():
            proc.stop(timeout=5)
            proc.start()

        self.parts.append(_Part(name, proc.alive, lambda: proc.proc.poll() if proc.proc else None, restart, now))

    def check(self) -> list[str]:
        """Look at every part once; restart those whose back-off is over. Returns what happened."""
        said = []
        for part in self.parts:
            now = self.clock()
            if part.due is None:
                if part.alive():
                    continue
                lived = now - part.started
                part.quick_failures = part.quick_failures + 1 if lived < QUICK_FAILURE_SECONDS else 0
                delay = min(RESTART_DELAY * 2 ** max(0, part.quick_failures - 1), RESTART_DELAY_MAX)
                part.due = now + delay
                said.append(f"{part.name} exited (code {part.exit_code()}) after {lived:.0f}s; "
                            f"restarting it in {delay:.0f}s")
            if now >= part.due:
                part.due = None
                part.restart()
                part.started = self.clock()
                part.restarts += 1
                said.append(f"{part.name} restarted (restart {part.restarts})")
        if self.models is not None:
            triton = next(p for p in self.parts if p.name == "Triton")
            said += self.models.check(triton_up=triton.due is None and triton.alive())
        return said


class ModelWatch:
    """Reloads a Triton model whose tier fails Envoy's health check while Triton itself is up."""

    def __init__(self, stack, models_by_cluster: dict[str, str], clock: Callable[[], float] = time.monotonic,
                 every: float = 1.0):
        self.stack, self.models_by_cluster, self.clock, self.every = stack, models_by_cluster, clock, every
        self._next_look = 0.0
        self._reloaded: dict[str, float] = {}
        self._ready_since: float | None = None
        self._said: "queue.Queue[str]" = queue.Queue()

    def check(self, *, triton_up: bool) -> list[str]:
        """Look (every ``every`` seconds) for tiers failing while Triton is up; once Triton has
        been ready for :data:`READY_SETTLE` seconds (a restarted Triton's tiers pass their health
        check within about a second of it), a failing tier has its model reloaded at once: a dead
        model process left alone, Triton may hold new requests while it tries to restart it."""
        now = self.clock()
        if now >= self._next_look:
            self._next_look = now + self.every
            if not (triton_up and self.stack.triton.is_ready()):
                self._ready_since = None
            elif self._ready_since is None:
                self._ready_since = now
            elif now - self._ready_since >= READY_SETTLE:
                for cluster in failing_clusters(self.stack.ports.admin, self.models_by_cluster):
                    model = self.models_by_cluster[cluster]
                    if now - self._reloaded.get(model, -RELOAD_EVERY) < RELOAD_EVERY:
                        continue
                    self._reloaded[model] = now
                    self._said.put(f"{model} fails its health check ({cluster}) while Triton is up; reloading it")
                    threading.Thread(target=self._reload, args=(model,), daemon=True).start()
        said = []
        while not self._said.empty():
            said.append(self._said.get_nowait())
        return said

    def _reload(self, model: str) -> None:
        base = f"http://127.0.0.1:{self.stack.ports.triton_http}/v2/repository/models/{model}"
        try:
            for action in ("unload", "load"):
                request = urllib.request.Request(f"{base}/{action}", data=b"{}", method="POST",
                                                 headers={"content-type": "application/json"})
                with urllib.request.urlopen(request, timeout=120) as reply:
                    reply.read()
        except OSError as exc:
            self._said.put(f"reloading {model} failed: {exc}")
            return
        self._said.put(f"{model} reloaded")


def failing_clusters(admin_port: int, clusters, timeout: float = 1.0) -> list[str]:
    """Those of ``clusters`` with a host that fails Envoy's active health check."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters?format=json", timeout=timeout) as r:
            data = json.loads(r.read())
    except (OSError, ValueError):
        return []
    failing = []
    for cluster in data.get("cluster_statuses", []):
        if cluster.get("name") not in clusters:
            continue
        for host in cluster.get("host_statuses", []):
            if host.get("health_status", {}).get("failed_active_health_check"):
                failing.append(cluster["name"])
                break
    return failing
