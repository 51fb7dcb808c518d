"""The report's tables: one row per run (scale, mode), as plain rows (for the HTML page) and as
rich tables (for the terminal)."""

from __future__ import annotations

from typing import Callable, Sequence

from rich import box
from rich.console import Console
from rich.table import Table


def usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.6f}"


def per_1k(value: float | None) -> str:
    """A per-request USD amount as USD per 1,000 requests (short enough for a terminal column)."""
    return "-" if value is None else f"{value * 1000:.4f}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _mix(shares: dict[str, float]) -> str:
    return " ".join(f"{k}:{100 * v:.0f}%" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])) or "-"


def _layers(layers: dict[str, dict]) -> str:
    return " ".join(f"{k}:{pct(v['hit_rate'])}" for k, v in sorted(layers.items())) or "-"


Column = tuple[str, Callable[[dict], str]]

TABLES: dict[str, list[Column]] = {
    "Cost per 1,000 answered requests (USD, per-token prices)": [
        ("total", lambda r: per_1k(r["cost_per_request_usd"])),
        ("prompt", lambda r: per_1k(r["cost_split_per_request_usd"]["prompt"])),
        ("compl.", lambda r: per_1k(r["cost_split_per_request_usd"]["completion"])),
        ("retries", lambda r: per_1k(r["cost_split_per_request_usd"]["retries"])),
        ("embed.", lambda r: per_1k(r["cost_split_per_request_usd"]["embeddings"])),
        ("overhead", lambda r: per_1k(r["cost_split_per_request_usd"]["overhead"])),
        ("booked", lambda r: per_1k(r["booked_per_request_usd"])),
    ],
    "GPU view (busy time of the models)": [
        ("GPU-s/req", lambda r: num(r["gpu_seconds_per_request"], 3)),
        ("USD/1k req", lambda r: per_1k(r["gpu_cost_per_request_usd"])),
        ("USD/GPU-h", lambda r: num(r["gpu_hour_usd"], 2)),
        ("inferences", lambda r: num(sum(m["inferences"] for m in r["gpu"].values()), 0) if r["gpu"] else "-"),
        ("upstream tok/req", lambda r: num(r["upstream_tokens"] / r["answered"], 0) if r["answered"] else "-"),
    ],
    "Latency, throughput, errors": [
        ("sent", lambda r: str(r["requests"])),
        ("ok", lambda r: str(r["answered"])),
        ("ok/s", lambda r: num(r["throughput_rps"], 2)),
        ("p50", lambda r: secs(r["latency_p50_s"])),
        ("p95", lambda r: secs(r["latency_p95_s"])),
        ("TTFT p50", lambda r: secs(r["ttft_p50_s"])),
        ("TTFT p95", lambda r: secs(r["ttft_p95_s"])),
        ("errors", lambda r: pct(r["error_rate"])),
        ("unfin.", lambda r: str(r["unfinished"])),
    ],
    "Caches, tiers, retries": [
        ("hits", lambda r: pct(r["cache_hit_rate"])),
        ("per layer", lambda r: _layers(r["cache_layers"])),
        ("tier mix", lambda r: _mix(r["tier_mix"])),
        ("large>L", lambda r: pct(r["large_share_on_large"])),
        ("cut", lambda r: num(r["tokens_cut"], 0)),
        ("retries", lambda r: str(r["retries"])),
        ("t/o", lambda r: str(r["timeouts"])),
        ("suppr.", lambda r: str(r["retries_suppressed"])),
    ],
}


def rows(runs: Sequence[dict], columns: list[Column]) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of one table: scale and mode first, then ``columns``."""
    header = ["scale", "mode", *(name for name, _ in columns)]
    body = [[f"{float(r['scale'] or 0):g}x", str(r["mode"]), *(fmt(r) for _, fmt in columns)]
            for r in sorted(runs, key=lambda r: (float(r["scale"] or 0), r["mode"] != "naive", str(r["mode"])))]
    return header, body


def comparison_lines(comparison: dict) -> list[str]:
    """One sentence per scale (gateway against naive) and per mode (growth with load)."""
    lines = []
    for row in comparison["by_scale"]:
        ratio = row["gateway_over_naive"]
        lines.append(f"{float(row['scale']):g}x: gateway {usd(row['gateway_cost_per_request_usd'])} per request against "
                     f"naive {usd(row['naive_cost_per_request_usd'])}"
                     + (f" ({100 * ratio:.0f}% of naive)" if ratio is not None else ""))
    for mode, g in comparison["growth"].items():
        if g["cost_factor"] is not None:
            lines.append(f"{mode}: cost per request x{g['cost_factor']:.2f} from {float(g['from_scale']):g}x to "
                         f"{float(g['to_scale']):g}x" + (f" (GPU-hour view x{g['gpu_cost_factor']:.2f})"
                                                if g["gpu_cost_factor"] is not None else ""))
    return lines


def print_tables(runs: Sequence[dict], comparison: dict, console: Console | None = None) -> None:
    """The report's tables and comparison lines on the terminal."""
    console = console or Console()
    for title, columns in TABLES.items():
        header, body = rows(runs, columns)
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i < 2 or name in ("tier mix", "per layer") else "right",
                             no_wrap=i < 2, min_width=7 if i == 1 else None)
        for row in body:
            table.add_row(*row)
        console.print(table)
    for line in comparison_lines(comparison):
        console.print(line)
