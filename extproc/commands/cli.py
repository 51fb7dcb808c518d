"""The ``extproc`` command: thin sub-commands over the layers below."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from extproc.commands.blas import prefer_fast_kernels
from extproc.framework.config import ConfigError, load_config


def _overrides(args) -> dict:
    server: dict = {}
    for key in ("host", "port", "workers", "worker_sockets", "log_level", "metrics_port", "triton_metrics_url"):
        value = getattr(args, key, None)
        if value is not None:
            server[key] = value
    out: dict = {"server": server} if server else {}
    if getattr(args, "redis", None):
        out["state"] = {"redis_url": args.redis}
    if getattr(args, "embeddings_triton_url", None):
        out["embeddings"] = {"triton_url": args.embeddings_triton_url}
    return out


def cmd_serve(args) -> int:
    """Run the ext_proc gRPC service (several worker processes on one port)."""
    from extproc.framework.gateway import TierRegistry
    from extproc.serving.server import configure_logging, serve

    config = load_config(args.config, overrides=_overrides(args))
    TierRegistry(config)  # a tier's missing upstream API key: a configuration error before any worker starts
    configure_logging(config.server.log_level)
    return serve(config)


def cmd_check_config(args) -> int:
    """Validate a configuration file and the plugins it names."""
    from extproc.framework.gateway import Gateway

    config = load_config(args.config)
    gateway = Gateway(config)
    print(f"configuration OK: {len(config.tiers)} tier(s) ({', '.join(config.tiers)}), "
          f"plugins in order: {', '.join(gateway.plugin_names) or 'none'}")
    return 0


def cmd_plugins(args) -> int:
    """List installed plugins and the hooks each implements."""
    from extproc.framework.gateway import Gateway
    from extproc.framework.hookspecs import HOOK_NAMES
    from extproc.framework.plugin_manager import installed_plugins

    config = load_config(args.config)
    gateway = Gateway(config)
    loaded = set(gateway.plugin_names)
    rows = []
    for name, ep in sorted(installed_plugins().items()):
        hooks = [h for h in HOOK_NAMES if name in gateway.hooks.implementers(h)]
        rows.append({"name": name, "target": ep.value, "loaded": name in loaded, "hooks": hooks})
    print(json.dumps(rows, indent=2))
    return 0


def cmd_up(args) -> int:
    """Start Triton (CPU models), the ext_proc service and Envoy; Ctrl-C stops them all."""
    from extproc.commands.stack import PortsInUse, Stack, StackPorts
    from extproc.commands.supervisor import Supervisor

    config_path = Path(args.config).resolve() if args.config else None
    config = load_config(config_path)  # fail before starting anything
    if args.redis and args.state == "memory":
        print("extproc up: --redis and --state memory contradict each other", file=sys.stderr)
        return 2
    # Shared state by default: a Redis of the stack's own, unless one is named (--redis, the config).
    local_redis = args.state == "redis" and not args.redis and not config.state.redis_url
    if args.state == "memory" and (args.workers or 0) != 1:
        print("extproc up: warning: --state memory with several workers: each worker has its own caches, "
              "coalescing and budgets (a repeated request is a hit only on the worker that stored it)",
              file=sys.stderr, flush=True)
    ports = StackPorts(listen=args.listen_port, admin=args.admin_port, extproc=args.extproc_port,
                       triton_http=args.triton_port, triton_grpc=args.triton_port + 1,
                       triton_metrics=args.triton_port + 2)
    stack = Stack(Path(args.work_dir).resolve(), ports=ports, config_path=config_path,
                  models=tuple(args.models.split(",")), workers=args.workers, redis_url=args.redis,
                  metrics_port=args.metrics_port, worker_sockets=args.worker_sockets, local_redis=local_redis,
                  embedder=config.embeddings.backend == "triton")
    if args.worker_sockets and not args.workers:
        print("extproc up: --worker-sockets needs --workers N (Envoy lists one endpoint per worker)",
              file=sys.stderr)
        return 2
    stopping = False

    def _stop(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)  # the terminal went away
    print(f"starting {'Redis, ' if local_redis else ''}Triton, the ext_proc service and Envoy ...", flush=True)
    started = time.monotonic()
    try:
        stack.start()  # on any failure it stops what it had started, then raises
    except PortsInUse as exc:
        print(f"extproc up: {exc}. Is another `extproc up` running? Stop it, or choose other ports "
              "(--listen-port, --admin-port, --extproc-port, --triton-port, --metrics-port).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while starting: make sure, signals ignored, that all is down
        _shut_down(stack, "\ninterrupted while starting; stopping ...")
        return 130
    except RuntimeError as exc:  # a part failed to start (its log's tail is in the message)
        print(f"extproc up: {exc}", file=sys.stderr)
        return 1
    p = stack.ports
    print(f"""
llm-extproc is up ({time.monotonic() - started:.1f}s)

  OpenAI API (through Envoy)  {stack.base_url}
  models                      auto, small/medium/large (llm-small, llm-medium, llm-large)
  ext_proc service            127.0.0.1:{p.extproc}  (gRPC, grpc.health.v1){
      f"; Envoy uses the sockets in {stack.socket_dir}" if stack.socket_dir else ""}
  Triton                      http://127.0.0.1:{p.triton_http}  (metrics :{p.triton_metrics})
  embeddings                  {"Triton's embedder model" if stack.embedder else "in the service's workers"}
  Envoy admin                 http://127.0.0.1:{p.admin}
  metrics (Prometheus)        {f"http://127.0.0.1:{args.metrics_port}/metrics" if args.metrics_port else "off"}
  state                       {_state_line(stack.redis_url or config.state.redis_url, local=local_redis)}
  logs                        {stack.work_dir / 'logs'}

Try it:
  curl -s {stack.base_url}/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "auto", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

Ctrl-C stops everything.
""", flush=True)
    supervisor = Supervisor(stack, models_by_cluster={t.cluster: t.model for t in config.tiers.values()
                                                      if t.cluster and t.model in stack.models})  # served by our Triton
    try:
        while not stopping:
            for line in supervisor.check():  # a part that died is restarted (with back-off), and said
                _say(f"extproc up: {line}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        _shut_down(stack, "\nstopping ...")
    return 0


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, raised once by :func:`_interrupt_once`."""


def _interrupt_once(signum, _frame):
    """SIGINT handler for ``extproc up``: the first Ctrl-C interrupts, later ones are ignored.

    With Python's default handler a second Ctrl-C raises again wherever the first one's cleanup
    is (the stack stopping what it had started, ``subprocess`` waiting for a child) and cuts it
    short; and a bare ``KeyboardInterrupt`` seen at the wrong moment can make the interpreter end
    by SIGINT instead of the 130 we return.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Interrupted


def _state_line(redis_url: str | None, local: bool = False) -> str:
    """The banner's state line; a Redis that does not answer is said there, not only in the log."""
    if not redis_url:
        return "in memory, per worker (--state memory)"
    if local:
        return f"{redis_url}  (the stack's own Redis: shared by every worker, AOF in the work dir)"
    import redis
    from redis.exceptions import RedisClusterException

    from extproc.state.redis_store import sync_client

    try:
        sync_client(redis_url, timeout=1).ping()
    except (redis.RedisError, RedisClusterException, OSError) as exc:
        return (f"{redis_url}  (UNREACHABLE: {type(exc).__name__}; the policies that use it degrade "
                "until it answers, see the service log)")
    return redis_url


def _shut_down(stack, message: str) -> None:
    """Stop the whole stack whatever else happens meanwhile.

    Ctrl-C reaches the whole foreground group: in `make up | tee log` the reader of our stdout
    may be gone already, the terminal may close (SIGHUP), a second Ctrl-C may come. None of them
    may cut the shutdown short and leave the children running.
    """
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _say(message)
    stack.stop()
    _say("stopped.")


def _say(text: str) -> None:
    """Print a progress line; if stdout's reader has gone, stay silent from then on."""
    try:
        print(text, flush=True)
    except OSError:  # BrokenPipeError, or the terminal itself gone (EIO)
        sys.stdout = open(os.devnull, "w")


def cmd_report(args) -> int:
    """Cost tables per workflow, tenant and tier (and PNG charts) from the usage records."""
    from extproc.observability.report import run

    files = args.file or ([] if args.redis else [".run/usage/usage.jsonl"])
    try:
        text, _charts = run(files=files, redis_url=args.redis, stream=args.stream, since=args.since,
                            until=args.until, fmt=args.format, charts=args.charts)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"extproc report: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


def cmd_triton_fill(args) -> int:
    """Fill the templated TensorRT-LLM model repository for one deployment."""
    from extproc.commands.trtllm_fill import main as fill_main

    return fill_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help=cmd_serve.__doc__)
    serve.add_argument("--config", help="YAML configuration (default: $EXTPROC_CONFIG or the embedded default)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="worker processes (default: config, 0 = one per core)")
    serve.add_argument("--worker-sockets", metavar="DIR",
                       help="worker i also listens on DIR/extproc-<i>.sock (one Envoy endpoint per worker)")
    serve.add_argument("--redis", metavar="URL", help="keep shared state in Redis")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics here (0 = off)")
    serve.add_argument("--triton-metrics-url", help="Triton's /metrics (queue depth, GPU memory, GPU-hour cost)")
    serve.add_argument("--embeddings-triton-url", metavar="URL",
                       help="embeddings.triton_url: the Triton serving the embedder (with embeddings.backend triton)")
    serve.set_defaults(func=cmd_serve)

    up = sub.add_parser("up", help=cmd_up.__doc__)
    up.add_argument("--config")
    up.add_argument("--listen-port", type=int, default=10000, help="Envoy's OpenAI listener")
    up.add_argument("--admin-port", type=int, default=9901)
    up.add_argument("--extproc-port", type=int, default=50051)
    up.add_argument("--triton-port", type=int, default=8000, help="Triton HTTP (gRPC and metrics use the next two)")
    up.add_argument("--workers", type=int)
    up.add_argument("--worker-sockets", action="store_true",
                    help="a Unix socket per worker (under the work dir), one Envoy endpoint each; needs --workers")
    up.add_argument("--redis", metavar="URL", help="share state in this Redis (default: the stack starts its own)")
    up.add_argument("--state", choices=("redis", "memory"), default="redis",
                    help="redis (default): shared by every worker, a local Redis unless --redis or the config "
                         "names one; memory: each worker its own (caches, coalescing, budgets)")
    up.add_argument("--models", default="llm-small,llm-medium,llm-large")
    up.add_argument("--work-dir", default=".run")
    up.add_argument("--metrics-port", type=int, default=9464, help="the service's Prometheus /metrics (0 = off)")
    up.set_defaults(func=cmd_up)

    check = sub.add_parser("check-config", help=cmd_check_config.__doc__)
    check.add_argument("config", nargs="?")
    check.set_defaults(func=cmd_check_config)

    plugins = sub.add_parser("plugins", help=cmd_plugins.__doc__)
    plugins.add_argument("--config")
    plugins.set_defaults(func=cmd_plugins)

    report = sub.add_parser("report", help=cmd_report.__doc__)
    report.add_argument("--file", action="append", metavar="PATH",
                        help="usage records: a JSON Lines file (its rotated copies too) or a directory; "
                             "repeatable (default: .run/usage/usage.jsonl)")
    report.add_argument("--redis", metavar="URL", help="read the usage records' Redis stream")
    report.add_argument("--stream", default="extproc:usage", help="the stream's full key (default: extproc:usage)")
    report.add_argument("--since", help="start of the period: 24h, 7d, 2026-01-31, ISO datetime or Unix seconds")
    report.add_argument("--until", help="end of the period (same forms)")
    report.add_argument("--format", choices=["table", "json"], default="table")
    report.add_argument("--charts", metavar="DIR", help="write cost_over_time.png, tier_mix.png, cache_hit_rate.png")
    report.set_defaults(func=cmd_report)

    from extproc.commands.admin import add_admin_parser

    add_admin_parser(sub)  # extproc admin ...: keys, budgets, spend over the admin API

    from extproc.commands import budget_keys

    budgets = sub.add_parser("budgets", help="budget state tools (migrate-keys: an earlier version's keys "
                             "to today's names)")
    budget_keys.add_arguments(budgets)

    from extproc.commands import loadtest

    lt = sub.add_parser("loadtest", help="the growth lab: replay a workload at scale factors, naive baseline "
                        "against the gateway, and report cost per request (extproc/lab/)")
    loadtest.add_arguments(lt)
    lt.set_defaults(func=loadtest.run)

    from extproc.commands import simulate

    sim = sub.add_parser("simulate", help="the growth lab's capacity simulator: GPU replica pools over a day at "
                         "scale factors, static against HPA autoscaling (extproc/lab/simulate/)")
    simulate.add_arguments(sim)
    sim.set_defaults(func=simulate.run)

    from extproc.commands.route import add_route_parsers

    add_route_parsers(sub)  # extproc route --explain, extproc router train|eval

    triton = sub.add_parser("triton", help="Triton model repository tools")
    tsub = triton.add_subparsers(dest="triton_command", required=True)
    fill = tsub.add_parser("fill", help=cmd_triton_fill.__doc__, add_help=False)
    fill.add_argument("rest", nargs=argparse.REMAINDER)
    fill.set_defaults(func=cmd_triton_fill)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prefer_fast_kernels()  # before anything imports NumPy (the embedder, the workers, Triton)
    if argv[:2] == ["triton", "fill"]:  # its own parser, options first included
        from extproc.commands.trtllm_fill import main as fill_main

        return fill_main(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"extproc: configuration error:\n{err}", file=sys.stderr)
        return 2
