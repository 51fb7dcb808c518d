"""``extproc loadtest``: the growth lab's runs, naive baseline against the gateway, same workload
and seed, at each scale factor, each against a real stack; then the report.

For each mode (``naive``, ``gateway``) it starts Envoy, the ext_proc service (with that mode's
configuration, on free ports) and a Redis of its own, in front of a Triton of that mode's own (started
fresh, so that no mode starts on another's backlog); runs each scale (the workload generator's plan for that scale and the seed), with the
gateway's state emptied and its service restarted before each scale after the first (so a scale
never hits the caches the previous one filled); stops the stack. ``--url`` drives an endpoint
that is already running instead (nothing started, nothing reset between scales).

Results: ``OUT/run.json`` (the command, the machine), ``OUT/<mode>/config.yaml`` (what the
gateway ran), ``OUT/<mode>/usage.jsonl`` (its usage records), ``OUT/<mode>/scale-<s>/``
(``requests.jsonl``, ``summary.json``: :mod:`extproc.lab.runner.run`), ``OUT/<mode>/stack/logs``,
and ``OUT/report/`` (:mod:`extproc.lab.report`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import yaml

MODES = ("naive", "gateway")


class LoadtestError(RuntimeError):
    """The load test cannot run as asked (the message says why)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", required=True, help="a shipped workload's name (clinical, support, "
                        "backoffice) or a workload YAML file")
    parser.add_argument("--scale", default="1", help="scale factors, comma-separated (default: 1)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of planned arrivals sent per "
                        "run (default: the day with --day, else 60)")
    parser.add_argument("--day", type=float, metavar="SECONDS", help="compress the workload's day (its "
                        "duration_s: the whole diurnal curve) into this many seconds; the arrival rate at "
                        "each point of the curve is unchanged")
    parser.add_argument("--drain", type=float, default=15.0, help="seconds after --duration that running "
                        "requests may finish; the rest are recorded unfinished (default: 15)")
    parser.add_argument("--max-requests", type=int, help="send at most this many requests per run")
    parser.add_argument("--seed", type=int, default=1, help="the workload generator's seed (default: 1)")
    parser.add_argument("--out", required=True, metavar="DIR", help="results directory")
    parser.add_argument("--mode", default="naive,gateway", help="modes to run, in order: naive, gateway "
                        "(default: both); with --url, the label of the run")
    parser.add_argument("--naive-config", metavar="FILE", help="instead of the shipped naive baseline")
    parser.add_argument("--gateway-config", metavar="FILE", help="instead of the default configuration plus "
                        "what the workload turns on")
    parser.add_argument("--workers", type=int, help="service worker processes (default: one per core)")
    parser.add_argument("--gpu-hour-usd", type=float, default=2.5, help="the report's GPU-hour view price "
                        "(default: 2.5)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-report", action="store_true", help="only the runs (extproc lab-report DIR later)")
    external = parser.add_argument_group("an endpoint already running (nothing is started)")
    external.add_argument("--url", help="its OpenAI base URL, e.g. http://127.0.0.1:10000/v1")
    external.add_argument("--config", metavar="FILE", help="the configuration it runs, for prices (default: the "
                          "embedded default)")
    external.add_argument("--metrics-url", help="the gateway's /metrics")
    external.add_argument("--triton-metrics-url", help="Triton's /metrics")
    external.add_argument("--envoy-stats-url", help="Envoy admin's /stats/prometheus")


def parse_scales(text: str) -> list[float]:
    """``"1,2,5"`` -> ``[1.0, 2.0, 5.0]``."""
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise LoadtestError(f"--scale {text!r}: expected numbers separated by commas, e.g. 1,2,5") from None
    if not scales or any(s <= 0 for s in scales):
        raise LoadtestError(f"--scale {text!r}: scale factors must be positive")
    return scales


def scale_label(scale: float) -> str:
    return f"{scale:g}"


# --- the workload (late imports: the generator is its own package) ---------------------------

def with_day(workload, day_s: float | None):
    """``workload`` with its day compressed (or stretched) to ``day_s`` seconds (None: as it is)."""
    if day_s is None:
        return workload
    if day_s <= 0:
        raise LoadtestError(f"--day {day_s:g}: must be positive")
    return workload.model_copy(update={"duration_s": float(day_s)})


def load_workload(name: str):
    """The workload: a shipped example by name (``clinical``...) or a YAML file
    (``extproc.lab.workload.model``, imported only now)."""
    try:
        from extproc.lab.workload import model
    except ImportError as exc:
        raise LoadtestError(f"the workload model is not available ({exc}): extproc.lab.workload.model must "
                            "provide load_workload(path) and example(name)") from None
    try:
        if name.endswith((".yaml", ".yml")) or Path(name).is_file():
            return model.load_workload(Path(name))
        return model.example(name)
    except model.WorkloadError as exc:
        raise LoadtestError(f"--workload {name}: {exc}") from None


def plan_for(workload, scale: float, seed: int) -> list:
    """The planned requests of ``workload`` at ``scale`` (``extproc.lab.workload.generator.generate``)."""
    try:
        from extproc.lab.workload.generator import generate
    except ImportError as exc:
        raise LoadtestError(f"the workload generator is not available ({exc}): extproc.lab.workload.generator "
                            "must provide generate(workload, scale, seed) -> list[PlannedRequest]") from None
    return list(generate(workload, scale, seed))


def workload_plugins(workload) -> list[dict]:
    """The plugin entries the workload turns on in the gateway mode (its ``gateway.plugins``, or
    a ``gateway_plugins`` attribute), as dicts."""
    gateway = getattr(workload, "gateway", None)
    if isinstance(workload, dict):
        gateway = workload.get("gateway")
    entries = gateway.get("plugins") if isinstance(gateway, dict) else getattr(gateway, "plugins", None)
    if entries is None:
        entries = getattr(workload, "gateway_plugins", None) or []
    out = []
    for entry in entries:
        if hasattr(entry, "model_dump"):
            entry = entry.model_dump(exclude_none=True)
        elif not isinstance(entry, dict):
            entry = dict(vars(entry))
        out.append(entry)
    return out


# --- configurations and prices ------------------------------------------------------------

def mode_config(mode: str, args, workload, mode_dir: Path) -> Path:
    """Write ``mode``'s configuration to ``mode_dir/config.yaml`` (validated) and return the path."""
    from extproc.framework.config import default_config_text, load_config
    from extproc.lab import configs

    override = args.naive_config if mode == "naive" else args.gateway_config
    if override:
        config = yaml.safe_load(Path(override).read_text())
    elif mode == "naive":
        config = configs.naive_config()
    else:
        config = configs.gateway_config(default_config_text(), workload_plugins(workload))
    config = configs.with_usage_file(config, str((mode_dir / "usage.jsonl").resolve()))
    mode_dir.mkdir(parents=True, exist_ok=True)
    path = mode_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    load_config(path)  # a ConfigError names the key
    return path


def prices_of(config_path: Path | None, gpu_hour_usd: float) -> dict:
    """What the report prices a run with: each tier's price, the costs section, the GPU-hour view."""
    from extproc.framework.config import load_config

    config = load_config(config_path)
    return {
        "config": str(config_path) if config_path else "embedded default",
        "tiers": {name: {"model": t.model, **t.price.model_dump()} for name, t in config.tiers.items()},
        "costs": config.costs.model_dump(),
        "gpu_hour_usd": gpu_hour_usd,
    }


# --- stacks ---------------------------------------------------------------------------------

def start_triton(work: Path):
    """One Triton with the three CPU tiers on free ports, ready."""
    from extproc.commands.stack import DEFAULT_MODELS, project_root
    from extproc.commands.tritonserver import TritonProcess, free_port

    triton = TritonProcess(project_root() / "triton_models", http_port=free_port(), grpc_port=free_port(),
                           metrics_port=free_port(), work_dir=work / "triton", log_path=work / "triton.log",
                           models=list(DEFAULT_MODELS))
    triton.start()
    try:
        triton.wait_ready(timeout=240)
    except BaseException:
        triton.stop()
        raise
    return triton


def start_stack(config_path: Path, work: Path, triton, workers: int | None):
    """Envoy + service + Redis of one mode in front of ``triton``; returns the started Stack."""
    from extproc.commands.stack import Stack, StackPorts
    from extproc.commands.tritonserver import free_port

    ports = StackPorts(0, 0, 0, triton.http_port, triton.grpc_port, triton.metrics_port, 0)
    stack = Stack(work, ports=ports, config_path=config_path, workers=workers, with_triton=False,
                  metrics_port=free_port(), local_redis=True)
    return stack.start()


#: Per-model gauges of work in Triton: its own queue, and the reference tiers' engine (waiting and
#: running sequences), as extproc.observability.metrics.BACKEND_QUEUES names them.
BUSY_GAUGES = ("reference_llm_waiting_requests", "reference_llm_active_sequences",
               'nv_trt_llm_request_metrics{request_type="waiting"}')


def triton_busy(metrics_url: str) -> float | None:
    """Requests queued or running in Triton now (None: its metrics cannot be read)."""
    import urllib.request

    from extproc.observability.triton_metrics import TritonMetricsError, parse_metrics

    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as reply:
            loads, _gpu = parse_metrics(reply.read().decode("utf-8", "replace"), BUSY_GAUGES)
    except (OSError, TritonMetricsError):
        return None
    return sum(load.pending + sum(load.extra.values()) for load in loads.values())


def wait_triton_idle(metrics_url: str, timeout: float = 180.0) -> tuple[float, bool]:
    """Wait until Triton has nothing queued or running (twice in a row, 0.5 s apart), so that a run
    never starts on the backlog of the previous one (abandoned requests still being computed).

    :return: ``(seconds waited, idle)``; ``idle`` is False when ``timeout`` passed first.
    """
    started = time.monotonic()
    quiet = 0
    while time.monotonic() - started < timeout:
        busy = triton_busy(metrics_url)
        quiet = quiet + 1 if busy == 0 else 0
        if quiet >= 2:
            return time.monotonic() - started, True
        time.sleep(0.5)
    return time.monotonic() - started, False


def _settle(metrics_url: str, what: str) -> dict:
    waited, idle = wait_triton_idle(metrics_url)
    if waited > 2:
        _say(f"{what}: waited {waited:.0f}s for Triton to finish the previous run's work"
             + ("" if idle else " (still busy: going on)"))
    return {"triton_idle_wait_s": round(waited, 1), "triton_idle": idle}


def reset_gateway(stack) -> None:
    """Empty the gateway's shared state and restart its service (per-worker state goes too)."""
    import redis

    stack.stop_service()
    if stack.redis_url:
        redis.Redis.from_url(stack.redis_url, socket_timeout=5).flushall()
    stack.start_service()
    stack.envoy.wait_until(lambda: stack.clusters_healthy(("extproc",)), 30, "seeing the service healthy again")


def target_of(stack):
    from extproc.lab.runner.run import Target

    p = stack.ports
    return Target(base_url=stack.base_url, gateway_metrics_url=f"http://127.0.0.1:{stack.metrics_port}/metrics",
                  triton_metrics_url=f"http://127.0.0.1:{p.triton_metrics}/metrics",
                  envoy_stats_url=f"http://127.0.0.1:{p.admin}/stats/prometheus")


# --- one run --------------------------------------------------------------------------------

def run_one(plan: list, target, out: Path, args, meta: dict) -> dict:
    """One scale of one mode (the runner, with a progress bar unless told not to)."""
    from extproc.lab.runner.driver import select
    from extproc.lab.runner.run import run_scale

    sent = len(select(plan, args.duration, args.max_requests))
    progress = None
    if not args.no_progress:
        from extproc.lab.runner.progress import RichProgress

        progress = RichProgress(sent, f"{meta['mode']} {scale_label(meta['scale'])}x")
    coro = run_scale(plan, target, out, duration=args.duration, max_requests=args.max_requests,
                     drain_s=args.drain, progress=progress, meta=meta)
    if progress is None:
        return asyncio.run(coro)
    with progress:
        return asyncio.run(coro)


def _say(text: str) -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    """``extproc loadtest``; returns the exit code."""
    try:
        return _run(args)
    except LoadtestError as exc:
        print(f"extproc loadtest: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from extproc.commands.stack import PortsInUse

    scales = parse_scales(args.scale)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not args.url and any(m not in MODES for m in modes):
        raise LoadtestError(f"--mode {args.mode!r}: modes are {', '.join(MODES)} (any label with --url)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    workload = with_day(load_workload(args.workload), args.day)
    if args.duration is None:
        args.duration = float(args.day) if args.day else 60.0
    plans = {scale: plan_for(workload, scale, args.seed) for scale in scales}  # before anything starts
    (out / "run.json").write_text(json.dumps({
        "command": "extproc loadtest " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["loadtest"] else sys.argv[1:]),
        "workload": args.workload, "seed": args.seed, "scales": scales, "modes": modes,
        "duration_s": args.duration, "day_s": workload.duration_s, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(), "machine": platform.platform(), "loadavg_at_start": " ".join(
            f"{x:.2f}" for x in os.getloadavg()),
    }, indent=1))
    meta = {"workload": args.workload, "seed": args.seed}
    if args.url:
        from extproc.lab.runner.run import Target

        target = Target(args.url, args.metrics_url, args.triton_metrics_url, args.envoy_stats_url)
        prices = prices_of(Path(args.config) if args.config else None, args.gpu_hour_usd)
        mode = modes[0] if modes else "external"
        for scale in scales:
            run_one(plans[scale], target, out / mode / f"scale-{scale_label(scale)}", args,
                    {**meta, "mode": mode, "scale": scale, "prices": prices})
    else:
        configs = {mode: mode_config(mode, args, workload, out / mode) for mode in modes}  # fail before starting
        for mode in modes:
            # A Triton of each mode's own: the naive baseline's backlog (requests its clients gave up
            # on, still being computed) can outlast any wait, and a mode that starts on it is
            # measured on a busy machine (a 300 s naive run left Triton busy past 180 s).
            _say(f"{mode}: starting Triton (the three CPU tiers) ...")
            triton = start_triton(out / mode)
            try:
                settled = _settle(triton.metrics_url, mode)  # Envoy's health checks need a free model
                _say(f"{mode}: starting Redis, the ext_proc service ({configs[mode]}) and Envoy ...")
                try:
                    stack = start_stack(configs[mode], out / mode / "stack", triton, args.workers)
                except PortsInUse as exc:
                    raise LoadtestError(str(exc)) from None
                try:
                    prices = prices_of(configs[mode], args.gpu_hour_usd)
                    for i, scale in enumerate(scales):
                        if i:
                            settled = _settle(triton.metrics_url, f"{mode} {scale_label(scale)}x")
                            reset_gateway(stack)
                        summary = run_one(plans[scale], target_of(stack), out / mode / f"scale-{scale_label(scale)}",
                                          args, {**meta, "mode": mode, "scale": scale, "prices": prices, **settled})
                        _say(f"{mode} {scale_label(scale)}x: {summary['outcomes']} in {summary['wall_s']:.1f}s")
                finally:
                    stack.stop()
            finally:
                triton.stop()
    if not args.no_report:
        from extproc.lab.report.build import build, print_report

        print_report(build(out))
    return 0
