"""``extproc simulate``: the growth lab's capacity simulator (:mod:`extproc.lab.simulate`).

A day of traffic at each scale factor, for static provisioning for the peak and Kubernetes-HPA
autoscaling on CPU utilisation, on queue depth and on requests in flight: replicas over the day,
GPU-hours per day, cost per request, p95 TTFT against the SLO and the idle capacity share, as
tables in the terminal and, with ``--out``, a JSON file.

    extproc simulate extproc/lab/simulate/examples/day.yaml --out sim.json --workers 1

``--slo-points 1,2,3,4`` instead prints each tier's SLO point with that many static replicas (the
highest rate within the TTFT SLO, and the autoscaling metrics per pod there:
:mod:`extproc.lab.simulate.slo_point`), from which the per-tier targets are derived.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _example() -> Path:
    from extproc.lab.simulate.run import EXAMPLE

    return EXAMPLE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``extproc simulate``."""
    parser.add_argument("config", nargs="?", help="simulation config, YAML or JSON (default: the shipped "
                        "example, extproc/lab/simulate/examples/day.yaml)")
    parser.add_argument("--out", metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--scales", help="scale factors, comma-separated, e.g. 1,2,5 (default: the config's)")
    parser.add_argument("--policies", help="policies, comma-separated: static, cpu, queue, inflight "
                        "(default: the config's)")
    parser.add_argument("--day-hours", type=float, help="length of the day in hours (default: the config's, 24)")
    parser.add_argument("--seed", type=int, help="seed (default: the config's)")
    parser.add_argument("--mix", metavar="FILE", help="the load runner's post-policy mix (JSON/YAML; "
                        "extproc/lab/simulate/workload.py)")
    parser.add_argument("--curves", metavar="FILE", help="measured curves: bench_triton_tiers.py's JSON cells "
                        "or its printed table")
    parser.add_argument("--workers", type=int, help="worker processes (default: the config's, else one per core)")
    parser.add_argument("--per-tier", action="store_true", help="also print the per-tier table")
    parser.add_argument("--slo-points", metavar="N,N,...", help="instead of the day: each tier's SLO point with "
                        "N static replicas (highest rate within the SLO; in flight, waiting and CPU per pod there)")
    parser.add_argument("--slo-tiers", metavar="T,T,...", help="--slo-points for these tiers only (default: all; "
                        "a fast tier's SLO point is at a high rate, slow to simulate)")
    parser.add_argument("--slo-hours", type=float, default=4.0, help="simulated hours per rate tried by "
                        "--slo-points (default 4)")


class _ArgError(ValueError):
    """A command-line value is not valid (the message names the option)."""


def _numbers(option: str, text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise _ArgError(f"{option} {text!r}: expected numbers separated by commas, e.g. 1,2,5") from None


def apply_args(config: Any, args: argparse.Namespace) -> Any:
    """``config`` (a :class:`~extproc.lab.simulate.config.SimConfig`) with the command line's overrides,
    validated again (errors name the key)."""
    from extproc.lab.simulate.config import parse_config

    changes: dict[str, Any] = {}
    if args.scales:
        changes["scales"] = _numbers("--scales", args.scales)
    if args.policies:
        changes["policies"] = [x.strip() for x in args.policies.split(",") if x.strip()]
    for key in ("day_hours", "seed", "workers"):
        if getattr(args, key, None) is not None:
            changes[key] = getattr(args, key)
    if args.mix:
        changes["mix_file"] = str(Path(args.mix).resolve())
    if args.curves:
        changes["curves_file"] = str(Path(args.curves).resolve())
    if not changes:
        return config
    data = config.model_dump()
    data.update(changes)
    base = data.pop("base_dir")
    return parse_config(data, "command line", base)


def print_slo_points(config: Any, replicas: list[int], hours: float, tiers: list[str] | None = None) -> None:
    """Each tier's SLO point for each replica count, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    from extproc.lab.simulate.autoscalers import CpuModel
    from extproc.lab.simulate.run import tier_specs
    from extproc.lab.simulate.slo_point import slo_point

    c = config.cpu
    cpu = CpuModel(c.idle, c.busy, c.per_seq_share, c.cap)
    table = Table(title=f"SLO points: p{config.slo_quantile:g} TTFT <= {config.slo_ttft_s:g} s, static replicas, "
                        f"Poisson arrivals, {hours:g} h per rate", title_justify="left")
    for col in ("tier", "replicas", "req/s", "per replica", f"p{config.slo_quantile:g} TTFT", "in flight / pod",
                "waiting / pod", "CPU"):
        table.add_column(col, justify="left" if col == "tier" else "right")
    for spec in tier_specs(config):
        if tiers and spec.name not in tiers:
            continue
        for n in replicas:
            pt = slo_point(spec.curve, spec.mix, n, slo_s=config.slo_ttft_s, quantile=config.slo_quantile,
                           hours=hours, seed=config.seed, cpu=cpu, sync_period_s=config.hpa.sync_period_s,
                           max_prefill_tokens=config.max_prefill_tokens)
            table.add_row(spec.name, str(n), f"{pt.rate_rps:.3f}", f"{pt.rate_rps / n:.3f}", f"{pt.ttft_s:.2f} s",
                          f"{pt.inflight_per_pod:.1f}", f"{pt.waiting_per_pod:.2f}", f"{pt.cpu_utilisation:.2f}")
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    """``extproc simulate``; returns the exit code."""
    from extproc.lab.simulate.config import ConfigError, load_config
    from extproc.lab.simulate.output import print_tables, write_json
    from extproc.lab.simulate.run import simulate

    try:
        config = apply_args(load_config(args.config or _example()), args)
        if args.slo_points:
            replicas = [int(x) for x in _numbers("--slo-points", args.slo_points)]
            if not replicas or min(replicas) < 1 or args.slo_hours <= 0:
                raise _ArgError("--slo-points: replica counts >= 1 (and --slo-hours > 0)")
            tiers = [t.strip() for t in (args.slo_tiers or "").split(",") if t.strip()]
            unknown = sorted(set(tiers) - set(config.tiers))
            if unknown:
                raise _ArgError(f"--slo-tiers: {', '.join(unknown)} not in the config's tiers")
            print_slo_points(config, replicas, args.slo_hours, tiers)
            return 0
        print(f"simulating {len(config.scales)} scale(s) x {len(config.policies)} policies x "
              f"{len(config.tiers)} tiers, a {config.day_hours:g} h day ...", file=sys.stderr)
        result = simulate(config)
    except (ConfigError, _ArgError, FileNotFoundError, ValueError) as exc:
        print(f"extproc simulate: {exc}", file=sys.stderr)
        return 2
    print_tables(result, per_tier=args.per_tier)
    print(f"simulated in {result.seconds:.1f} s", file=sys.stderr)
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
