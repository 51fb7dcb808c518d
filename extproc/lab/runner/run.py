"""One measured run: scrape the metrics, replay a plan, scrape again, write the results.

Files written to ``out_dir``:

* ``requests.jsonl``: one :meth:`RequestResult.to_json` line per request sent, in plan order;
* ``summary.json``: the run's settings, wall time, load average, the prices it is to be costed
  with (given by the caller, e.g. ``extproc loadtest`` from the configuration the gateway ran), and
  per endpoint (``gateway``, ``triton``, ``envoy``) what its cumulative metrics moved by during the
  run (:mod:`extproc.lab.runner.scrape`), or why they could not be read.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import httpx

from extproc.lab.runner import scrape
from extproc.lab.runner.driver import Progress, drive, select
from extproc.lab.workload.plan import PlannedRequest

#: Samples that must stop moving before the "after" scrape is taken (the gateway books a request
#: when its stream closes; Triton may count a decoupled model's request a moment after the
#: client's last byte).
_SETTLE_ON = (("gateway", "extproc_requests_total"), ("triton", "nv_inference_count_total"))


@dataclass(frozen=True)
class Target:
    """The endpoint a run drives, and where its metrics are (None: not read)."""

    base_url: str  #: the OpenAI base URL (``http://127.0.0.1:10000/v1``) or its origin
    gateway_metrics_url: str | None = None  #: the gateway parent's ``/metrics``
    triton_metrics_url: str | None = None  #: Triton's ``/metrics``
    envoy_stats_url: str | None = None  #: Envoy admin ``/stats/prometheus``

    def endpoints(self) -> dict[str, str | None]:
        return {"gateway": self.gateway_metrics_url, "triton": self.triton_metrics_url,
                "envoy": self.envoy_stats_url}


async def _snapshots(client: httpx.AsyncClient, target: Target) -> dict[str, tuple[dict | None, str | None]]:
    names = list(target.endpoints())
    got = await asyncio.gather(*(scrape.snapshot(client, url) for url in target.endpoints().values()))
    return dict(zip(names, got))


def _settle_key(snaps) -> tuple:
    return tuple(scrape.total(snaps[where][0], name) if snaps[where][0] is not None else None
                 for where, name in _SETTLE_ON)


async def _settled(client: httpx.AsyncClient, target: Target, timeout: float) -> dict:
    snaps = await _snapshots(client, target)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        await asyncio.sleep(0.5)
        again = await _snapshots(client, target)
        if _settle_key(again) == _settle_key(snaps):
            return again
        snaps = again
    return snaps


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


async def run_scale(plan: Sequence[PlannedRequest], target: Target, out_dir: Path, *, duration: float,
                    max_requests: int | None = None, drain_s: float = 15.0, progress: Progress | None = None,
                    meta: dict | None = None, settle_s: float = 5.0) -> dict:
    """Replay ``plan`` against ``target`` and write ``requests.jsonl`` and ``summary.json``.

    :param meta: merged into the summary (mode, scale, seed, workload, prices...).
    :return: the summary.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    async with httpx.AsyncClient(trust_env=False) as scraper:
        before = await _snapshots(scraper, target)
        load_before = _loadavg()
        outcome = await drive(plan, target.base_url, duration=duration, max_requests=max_requests,
                              drain_s=drain_s, progress=progress)
        after = await _settled(scraper, target, settle_s)
    with (out_dir / "requests.jsonl").open("w") as f:
        for result in outcome.results:
            f.write(json.dumps(result.to_json(), separators=(",", ":")) + "\n")
    metrics = {}
    for where in target.endpoints():
        (old, why_old), (new, why_new) = before[where], after[where]
        if old is None or new is None:
            metrics[where] = {"delta": None, "error": why_old or why_new}
        else:
            metrics[where] = {"delta": scrape.delta(old, new), "error": None}
    counts = {o: sum(1 for r in outcome.results if r.outcome == o) for o in ("ok", "error", "unfinished")}
    summary = {
        **(meta or {}),
        "base_url": target.base_url,
        "started_unix": outcome.started_unix,
        "duration_s": duration,
        "drain_s": drain_s,
        "max_requests": max_requests,
        "planned_total": len(plan),
        "sent": len(select(plan, duration, max_requests)),
        "wall_s": outcome.wall_s,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "outcomes": counts,
        "metrics": metrics,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary
