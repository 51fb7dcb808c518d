"""The simulator's output: the terminal tables (rich) and the JSON file of a :class:`~.run.SimResult`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from extproc.lab.simulate.run import SimResult


def _fmt_s(x: float) -> str:
    if x is None or math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def print_tables(result: SimResult, console=None, per_tier: bool = False) -> None:
    """The result as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg = result.config
    table = Table(title=f"Capacity simulation: a {cfg['day_hours']:g} h day, TTFT SLO p{cfg['slo_quantile']:g} "
                        f"<= {cfg['slo_ttft_s']:g} s", title_justify="left")
    for col, just in (("scale", "right"), ("policy", "left"), ("requests", "right"), ("GPU-h/day", "right"),
                      ("vs static", "right"), ("$/request", "right"), ("p50 TTFT", "right"), ("p95 TTFT", "right"),
                      ("worst tier p95", "right"),
                      ("within SLO", "right"), ("idle", "right"), ("slots used", "right"),
                      ("replicas mean / max", "right")):
        table.add_column(col, justify=just)
    for r in result.results:
        try:
            vs = f"{-100 * result.saving(r.policy, r.scale):+.0f}%" if r.policy != "static" else ""
        except KeyError:
            vs = ""
        table.add_row(f"{r.scale:g}x", r.policy, f"{r.requests:,}", f"{r.gpu_hours:,.1f}", vs,
                      f"${r.cost_per_request:.5f}", _fmt_s(r.p50_ttft_s), _fmt_s(r.p95_ttft_s),
                      _fmt_s(r.worst_tier_p95_ttft_s),
                      f"{100 * r.slo_share:.1f}%", f"{100 * r.idle_share:.0f}%", f"{100 * r.slot_utilisation:.0f}%",
                      f"{r.replicas_mean:.1f} / {r.replicas_max}")
    console.print(table)
    if per_tier:
        t2 = Table(title="Per tier", title_justify="left")
        for col in ("scale", "policy", "tier", "replica", "GPU-h", "p95 TTFT", "within SLO", "idle",
                    "replicas mean / max", "static sizing"):
            t2.add_column(col)
        for r in result.results:
            for name, t in r.tiers.items():
                sz = t.get("static_sizing")
                t2.add_row(f"{r.scale:g}x", r.policy, name, t["curve"], f"{t['gpu_hours']:,.1f}", _fmt_s(t["p95_ttft_s"]),
                           f"{100 * t['slo_share']:.1f}%", f"{100 * t['idle_share']:.0f}%",
                           f"{t['replicas_mean']:.1f} / {t['replicas_max']}",
                           f"{sz['replicas']} (p95 {_fmt_s(sz['p95_ttft_s'])}{'' if sz['met'] else ', SLO missed'})"
                           if sz else "")
        console.print(t2)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o


def write_json(result: SimResult, path: str | Path) -> None:
    """``result`` as JSON (infinite TTFTs as "inf", NaN as null)."""
    Path(path).write_text(json.dumps(_finite(result.to_dict()), default=_json_default, indent=1) + "\n")
