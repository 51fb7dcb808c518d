"""Reading a results directory: every run's ``summary.json`` and ``requests.jsonl`` under it.

Layout written by ``extproc loadtest``: ``DIR/<mode>/scale-<s>/{summary.json,requests.jsonl}``;
any directory holding those two files is a run (its mode and scale come from the summary), so
hand-made layouts work too. ``DIR/report/`` (the report's own output) is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REPORT_DIR = "report"


@dataclass
class Run:
    """One run's files, read."""

    path: Path
    summary: dict
    requests: list[dict]


def read_run(path: Path) -> Run:
    summary = json.loads((path / "summary.json").read_text())
    requests = []
    with (path / "requests.jsonl").open() as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                requests.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path / 'requests.jsonl'}:{number}: not JSON: {exc}") from None
    return Run(path, summary, requests)


def find_runs(results_dir: Path) -> list[Run]:
    """Every run under ``results_dir``, ordered by mode (naive first) then scale."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir}: no such directory")
    runs = []
    for summary in sorted(results_dir.rglob("summary.json")):
        if REPORT_DIR in summary.relative_to(results_dir).parts[:1]:
            continue
        if (summary.parent / "requests.jsonl").exists():
            runs.append(read_run(summary.parent))
    order = {"naive": 0, "gateway": 1}
    runs.sort(key=lambda r: (order.get(r.summary.get("mode"), 2), str(r.summary.get("mode")),
                             float(r.summary.get("scale") or 0)))
    return runs
