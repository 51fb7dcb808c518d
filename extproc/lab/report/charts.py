"""The report's PNG charts (matplotlib, Agg backend: no display needed).

* ``cost_per_request.png``: cost per answered request against load (scale), one line per mode,
  the per-token cost solid and the GPU-hour view dashed (its own axis);
* ``cost_split.png``: where each run's cost per request went (prompt, completion, retries,
  embeddings, overhead), stacked;
* ``latency.png``: p95 latency and p95 time to first token against load, per mode;
* ``tier_mix.png``: the share of answers each tier gave, per run;
* ``gpu_seconds.png``: busy seconds per answered request against load, per mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from extproc.lab.report.compute import COST_KINDS

CHARTS = ("cost_per_request.png", "cost_split.png", "latency.png", "tier_mix.png", "gpu_seconds.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_mode(runs: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: float(r["scale"] or 0)):
        out.setdefault(str(r["mode"]), []).append(r)
    return out


def _label(r: dict) -> str:
    return f"{r['mode']}\n{float(r['scale'] or 0):g}x"


def draw(runs: Sequence[dict], out_dir: Path) -> list[Path]:
    """Write the charts into ``out_dir``; returns their paths."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    ordered = sorted(runs, key=lambda r: (float(r["scale"] or 0), r["mode"] != "naive"))

    colour = {mode: f"C{i}" for i, mode in enumerate(_by_mode(runs))}
    scales = sorted({float(r["scale"]) for r in runs if r["scale"] is not None})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, mine in _by_mode(runs).items():
        pts = [(float(r["scale"]), r["cost_per_request_usd"]) for r in mine if r["cost_per_request_usd"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=colour[mode], label=f"{mode} (per-token prices)")
    ax.set_xticks(scales)
    ax.set_xlabel("load (scale factor)")
    ax.set_ylabel("USD per answered request")
    ax.set_ylim(bottom=0)
    gpu = ax.twinx()
    for mode, mine in _by_mode(runs).items():
        pts = [(float(r["scale"]), r["gpu_cost_per_request_usd"]) for r in mine
               if r["gpu_cost_per_request_usd"] is not None]
        if pts:
            gpu.plot(*zip(*pts), marker="s", linestyle="--", alpha=0.6, color=colour[mode],
                     label=f"{mode} (GPU-hour view)")
    gpu.set_ylabel("USD per answered request (GPU-hour view)")
    gpu.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + gpu.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + gpu.get_legend_handles_labels()[1]
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title("Cost per request against load")
    written.append(_save(plt, fig, out_dir / "cost_per_request.png"))

    fig, ax = plt.subplots(figsize=(max(6, len(ordered) * 1.1), 4.2))
    bottom = [0.0] * len(ordered)
    for kind in COST_KINDS:
        values = [r["cost_split_per_request_usd"][kind] or 0.0 for r in ordered]
        ax.bar([_label(r) for r in ordered], values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("USD per answered request")
    ax.set_title("Where the money went")
    ax.legend(fontsize=8)
    written.append(_save(plt, fig, out_dir / "cost_split.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, mine in _by_mode(runs).items():
        for key, style, what in (("latency_p95_s", "-", "p95 latency"), ("ttft_p95_s", ":", "p95 TTFT")):
            pts = [(float(r["scale"]), r[key]) for r in mine if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle=style, color=colour[mode], label=f"{mode} {what}")
    ax.set_xticks(scales)
    ax.set_xlabel("load (scale factor)")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Latency against load")
    written.append(_save(plt, fig, out_dir / "latency.png"))

    fig, ax = plt.subplots(figsize=(max(6, len(ordered) * 1.1), 4.2))
    tiers = sorted({t for r in ordered for t in r["tier_mix"]})
    bottom = [0.0] * len(ordered)
    for tier in tiers:
        values = [100 * r["tier_mix"].get(tier, 0.0) for r in ordered]
        ax.bar([_label(r) for r in ordered], values, bottom=bottom, label=tier)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("% of answers")
    ax.set_title("Tier mix")
    if tiers:
        ax.legend(fontsize=8)
    written.append(_save(plt, fig, out_dir / "tier_mix.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, mine in _by_mode(runs).items():
        pts = [(float(r["scale"]), r["gpu_seconds_per_request"]) for r in mine if r["gpu_seconds_per_request"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=colour[mode], label=mode)
    ax.set_xticks(scales)
    ax.set_xlabel("load (scale factor)")
    ax.set_ylabel("busy seconds per answered request")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("GPU-seconds per request")
    written.append(_save(plt, fig, out_dir / "gpu_seconds.png"))
    return written


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
