"""``extproc report``: unit economics from the usage records.

Reads the records (JSON Lines files and/or a Redis stream, see :mod:`extproc.observability.usage`), keeps those
in the period asked for, and prints a cost table per workflow, tenant and tier: requests, tokens,
cost, cost per request and per 1K tokens, cache hit rate, share of traffic, tokens and cost saved,
and the cost split (prompt, completion, retries, embeddings, overhead). ``--format json`` prints the
same numbers for scripts; ``--charts DIR`` draws PNGs (cost over time, tier mix, cache hit rate)
with matplotlib, imported only then (``pip install 'llm-extproc[report]'``).

Definitions: a *cache hit* is a request whose ``cache_status`` is ``hit``, ``semantic_hit``,
``coalesced`` or ``idempotent`` (answered without a new upstream generation); the hit rate is hits
over requests. *Cost per 1K tokens* is cost / (prompt + completion tokens) × 1000. *Share* is the
group's fraction of the period's requests.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

HIT_STATUSES = frozenset({"hit", "semantic_hit", "coalesced", "idempotent"})
COST_KINDS = ("prompt", "completion", "retries", "embeddings", "overhead")
GROUPS = ("workflow", "tenant", "tier")
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: str | None, now: float | None = None) -> float | None:
    """``24h`` / ``30m`` / ``7d`` (that long ago), an ISO date or datetime (UTC unless it says), or Unix seconds."""
    if value is None:
        return None
    value = value.strip()
    now = time.time() if now is None else now
    m = _RELATIVE.match(value)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"cannot read the time {value!r}: use 24h, 7d, 2026-01-31, 2026-01-31T12:00 or Unix seconds")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def in_period(records: Iterable[dict], since: float | None, until: float | None) -> list[dict]:
    return [r for r in records if (since is None or r["ts"] >= since) and (until is None or r["ts"] < until)]


def _key(record: dict, by: str) -> str:
    value = record.get(by)
    return "none" if value is None else str(value)


def _row(records: list[dict], total_requests: int) -> dict:
    n = len(records)
    prompt = sum(r.get("prompt_tokens") or 0 for r in records)
    completion = sum(r.get("completion_tokens") or 0 for r in records)
    cost = sum(r.get("cost_usd") or 0.0 for r in records)
    hits = sum(1 for r in records if r.get("cache_status") in HIT_STATUSES)
    split = {k: sum((r.get("cost") or {}).get(k, 0.0) for r in records) for k in COST_KINDS}
    tokens = prompt + completion
    return {
        "requests": n,
        "completed": sum(1 for r in records if r.get("outcome") == "completed"),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd": cost,
        "cost_per_request_usd": cost / n if n else 0.0,
        "cost_per_1k_tokens_usd": cost / tokens * 1000 if tokens else 0.0,
        "cache_hits": hits,
        "cache_hit_rate": hits / n if n else 0.0,
        "share": n / total_requests if total_requests else 0.0,
        "tokens_saved": sum(r.get("tokens_saved") or 0 for r in records),
        "cost_saved_usd": sum(r.get("cost_saved_usd") or 0.0 for r in records),
        "retries": sum(1 for r in records if r.get("retry")),
        "cost_split_usd": split,
    }


def summarize(records: list[dict], *, since: float | None = None, until: float | None = None,
              groups: tuple[str, ...] = GROUPS) -> dict:
    """The report's numbers: totals and one table per grouping (rows sorted by cost, largest first)."""
    total = len(records)
    out = {
        "period": {"since": since, "until": until,
                   "first": min((r["ts"] for r in records), default=None),
                   "last": max((r["ts"] for r in records), default=None)},
        "total": _row(records, total),
    }
    for by in groups:
        buckets: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            buckets[_key(r, by)].append(r)
        rows = [{by: name, **_row(rs, total)} for name, rs in buckets.items()]
        rows.sort(key=lambda row: (-row["cost_usd"], -row["requests"], row[by]))
        out[f"by_{by}"] = rows
    return out


def _fmt_usd(x: float) -> str:
    return f"{x:.6f}" if x < 1 else f"{x:,.2f}"


def render_table(summary: dict) -> str:
    """The report as plain-text tables."""
    def ts(x):
        return "-" if x is None else datetime.fromtimestamp(x, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    p, t = summary["period"], summary["total"]
    lines = [f"usage report: {t['requests']} request(s), {ts(p['first'])} .. {ts(p['last'])}",
             f"total cost ${_fmt_usd(t['cost_usd'])}  (" + ", ".join(
                 f"{k} ${_fmt_usd(v)}" for k, v in t["cost_split_usd"].items()) + ")",
             f"tokens {t['prompt_tokens']} prompt + {t['completion_tokens']} completion; "
             f"cache hit rate {t['cache_hit_rate']:.1%}; tokens saved {t['tokens_saved']}; "
             f"cost saved ${_fmt_usd(t['cost_saved_usd'])}", ""]
    cols = [("requests", "requests", "{}"), ("share", "share", "{:.1%}"), ("prompt tok", "prompt_tokens", "{}"),
            ("compl tok", "completion_tokens", "{}"), ("cost $", "cost_usd", None),
            ("$/request", "cost_per_request_usd", None), ("$/1K tok", "cost_per_1k_tokens_usd", None),
            ("cache hit", "cache_hit_rate", "{:.1%}"), ("tok saved", "tokens_saved", "{}"),
            ("retries", "retries", "{}")]
    for by in GROUPS:
        rows = summary.get(f"by_{by}")
        if rows is None:
            continue
        table = [[by, *[c[0] for c in cols]]]
        for row in rows:
            table.append([str(row[by]), *[(_fmt_usd(row[k]) if f is None else f.format(row[k])) for _, k, f in cols]])
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines.append(f"by {by}:")
        for i, r in enumerate(table):
            lines.append("  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        lines.append("")
    return "\n".join(lines)


def _bucket_seconds(span: float, buckets: int = 30) -> float:
    for step in (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 6 * 3600, 86400, 7 * 86400):
        if span / step <= buckets:
            return step
    return 30 * 86400


def time_series(records: list[dict]) -> dict:
    """Per time bucket: cost, requests per tier, cache hit rate (what the charts draw)."""
    if not records:
        return {"bucket_seconds": 0, "starts": [], "cost_usd": [], "tiers": {}, "cache_hit_rate": []}
    first = min(r["ts"] for r in records)
    last = max(r["ts"] for r in records)
    step = _bucket_seconds(last - first)
    start = first - first % step
    n = int((last - start) // step) + 1
    cost, reqs, hits = [0.0] * n, [0] * n, [0] * n
    tiers: dict[str, list[int]] = defaultdict(lambda: [0] * n)
    for r in records:
        i = int((r["ts"] - start) // step)
        cost[i] += r.get("cost_usd") or 0.0
        reqs[i] += 1
        hits[i] += r.get("cache_status") in HIT_STATUSES
        tiers[_key(r, "tier")][i] += 1
    return {"bucket_seconds": step, "starts": [start + i * step for i in range(n)], "cost_usd": cost,
            "tiers": dict(tiers), "requests": reqs,
            "cache_hit_rate": [h / q if q else 0.0 for h, q in zip(hits, reqs)]}


def write_charts(records: list[dict], directory: str | Path) -> list[Path]:
    """cost_over_time.png, tier_mix.png and cache_hit_rate.png in ``directory``."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("charts need matplotlib: pip install 'llm-extproc[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    series = time_series(records)
    when = [datetime.fromtimestamp(s, timezone.utc) for s in series["starts"]]
    width = series["bucket_seconds"] / 86400 * 0.9 if when else 0.01
    paths = []

    import matplotlib.dates as mdates

    span = (series["starts"][-1] - series["starts"][0]) if when else 0
    time_format = mdates.DateFormatter("%H:%M:%S" if span < 86400 else "%m-%d %H:%M")

    def save(fig, name):
        for ax in fig.axes:
            ax.xaxis.set_major_formatter(time_format)
            ax.set_xlabel("UTC")
        fig.autofmt_xdate()
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(when, series["cost_usd"], width=width, color="#3b7dd8")
    ax.set_title(f"Cost per {series['bucket_seconds']:g} s (USD)")
    ax.set_ylabel("USD")
    save(fig, "cost_over_time.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0] * len(when)
    for tier, counts in sorted(series["tiers"].items()):
        ax.bar(when, counts, width=width, bottom=bottom, label=tier)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_title("Tier mix (requests)")
    ax.set_ylabel("requests")
    if series["tiers"]:
        ax.legend()
    save(fig, "tier_mix.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(when, [x * 100 for x in series["cache_hit_rate"]], marker="o", color="#2a9d55")
    ax.set_ylim(0, 100)
    ax.set_title("Cache hit rate (%)")
    ax.set_ylabel("% of requests")
    save(fig, "cache_hit_rate.png")
    return paths


def run(*, files: list[str], redis_url: str | None, stream: str, since: str | None, until: str | None,
        fmt: str, charts: str | None) -> tuple[str, list[Path]]:
    """Everything ``extproc report`` does; returns the text to print and the charts written."""
    from extproc.observability.usage import read_jsonl, read_redis

    records: list[dict] = []
    for f in files:
        records.extend(read_jsonl(f))
    if redis_url:
        records.extend(read_redis(redis_url, stream))
    seen, unique = set(), []
    for r in records:  # the same request in the file and the stream (Redis fallback) counts once
        key = (r.get("request_id"), r.get("ts"))
        if key not in seen:
            seen.add(key)
            unique.append(r)
    lo, hi = parse_time(since), parse_time(until)
    selected = sorted(in_period(unique, lo, hi), key=lambda r: r["ts"])
    summary = summarize(selected, since=lo, until=hi)
    written = write_charts(selected, charts) if charts else []
    if fmt == "json":
        if charts:
            summary["charts"] = [str(p) for p in written]
        return json.dumps(summary, indent=2), written
    text = render_table(summary)
    if written:
        text += "charts: " + ", ".join(str(p) for p in written) + "\n"
    return text, written
