"""Build the report of a results directory: ``report.json``, ``index.html`` and the PNG charts in
``DIR/report/`` (or another directory), and the tables on the terminal."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from extproc.lab.report import charts, html, tables
from extproc.lab.report.compute import compare, summarise
from extproc.lab.report.results import REPORT_DIR, find_runs


@dataclass
class Report:
    """What :func:`build` made."""

    runs: list[dict]  #: one :func:`~extproc.lab.report.compute.summarise` dict per run
    comparison: dict  #: :func:`~extproc.lab.report.compute.compare`
    out_dir: Path
    json_path: Path
    html_path: Path
    charts: list[Path]


def build(results_dir: Path, out_dir: Path | None = None, *, gpu_hour_usd: float | None = None) -> Report:
    """Read every run under ``results_dir`` and write the report.

    :param gpu_hour_usd: price the GPU view at this instead of what each run recorded.
    :raises FileNotFoundError: no run found.
    """
    results_dir = Path(results_dir)
    found = find_runs(results_dir)
    if not found:
        raise FileNotFoundError(f"{results_dir}: no run (a directory with summary.json and requests.jsonl)")
    runs = []
    for run in found:
        summary = run.summary
        if gpu_hour_usd is not None:
            summary = {**summary, "prices": {**(summary.get("prices") or {}), "gpu_hour_usd": gpu_hour_usd}}
        numbers = summarise(run.requests, summary)
        numbers["path"] = str(run.path.relative_to(results_dir))
        runs.append(numbers)
    comparison = compare(runs)
    out_dir = Path(out_dir) if out_dir is not None else results_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = charts.draw(runs, out_dir)
    meta = _meta(results_dir, found)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps({"meta": meta, "runs": runs, "comparison": comparison}, indent=1, sort_keys=True))
    html_path = out_dir / "index.html"
    html_path.write_text(html.render(runs, comparison, [p.name for p in drawn], meta))
    return Report(runs, comparison, out_dir, json_path, html_path, drawn)


def _meta(results_dir: Path, found) -> dict:
    first = found[0].summary
    meta = {"results": str(results_dir), "workload": first.get("workload"), "seed": first.get("seed"),
            "duration_s": first.get("duration_s")}
    run_file = results_dir / "run.json"  # what extproc loadtest ran (command, machine)
    if run_file.exists():
        meta.update({k: v for k, v in json.loads(run_file.read_text()).items() if isinstance(v, (str, int, float))})
    return meta


def print_report(report: Report, console: Console | None = None) -> None:
    """The tables on the terminal, then where the files are."""
    console = console or Console()
    tables.print_tables(report.runs, report.comparison, console)
    console.print(f"report: {report.html_path} ({report.json_path.name}, {len(report.charts)} charts)")
