"""``extproc lab-report DIR``: the growth lab's report of a results directory (``extproc loadtest
--out DIR`` writes one, and the report at its end)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", metavar="DIR", help="the results directory of extproc loadtest")
    parser.add_argument("--out", metavar="DIR", help="where to write index.html, report.json and the PNGs "
                        "(default: DIR/report)")
    parser.add_argument("--gpu-hour-usd", type=float, help="price the GPU view at this (default: what the run "
                        "recorded, else 2.5)")


def run(args: argparse.Namespace) -> int:
    from extproc.lab.report.build import build, print_report

    try:
        report = build(Path(args.results), Path(args.out) if args.out else None, gpu_hour_usd=args.gpu_hour_usd)
    except (FileNotFoundError, ValueError) as exc:
        print(f"extproc lab-report: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    return 0
