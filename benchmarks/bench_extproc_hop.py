#!/usr/bin/env python3
"""What does the ext_proc hop cost? Latency and throughput through Envoy on loopback.

Cases (all in front of the same stub upstream, benchmarks/stub_upstream.py):

  stub  the stub alone, no proxy (the floor; for context)
  a     Envoy WITHOUT the ext_proc filter -> stub      (envoy/envoy-nofilter.yaml)
  b     Envoy + the ext_proc service -> stub, tier `passthrough`   (envoy/envoy.yaml)
  c     the LiteLLM proxy (one worker) -> stub

For each case: p50/p99 latency at 1 and at 16 concurrent clients and requests/s at
saturation (64 connections by default), measured with wrk (`benchmarks/wrk/chat.lua`,
POST /v1/chat/completions). The hop cost is case b minus case a.

    python benchmarks/bench_extproc_hop.py                   # all cases, 10 s each
    python benchmarks/bench_extproc_hop.py --cases a,c --duration 5 --out /tmp/hop.json

wrk is installed with scripts/ensure-debs.sh if missing. The service (case b) is started with
`--extproc-cmd` (default: `extproc serve --config {config} --port {port} --workers {workers}`
from this interpreter's venv); LiteLLM (case c) comes from this interpreter if importable, else
from --litellm-venv (created and filled from PyPI when missing, unless --no-install). A case
that cannot run is skipped with the reason printed. Everything binds 127.0.0.1, every run is
bounded by --duration, and every process started here is stopped by its own process id.
Nothing here is run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc.commands.envoy_config import envoy_binary, write_envoy_config  # noqa: E402

STUB = ROOT / "benchmarks" / "stub_upstream.py"
WRK_LUA = ROOT / "benchmarks" / "wrk" / "chat.lua"
ENSURE_DEBS = ROOT / "scripts" / "ensure-debs.sh"
MODEL_ALIAS = "stub"          # public name the service maps to tier passthrough
UPSTREAM_MODEL = "stub-model"  # what the stub is called upstream
BODY = {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
DEFAULT_EXTPROC_CMD = "{bindir}/extproc serve --config {config} --port {port} --workers {workers}"


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    env: dict | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> "Proc":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log, "wb")
        self.popen = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=self.env,
                                      start_new_session=True)
        fh.close()
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 8.0) -> None:
        """SIGTERM this process's own group (it was started in a new session), then SIGKILL."""
        if self.popen is None or self.popen.poll() is not None:
            return
        pgid = self.popen.pid  # start_new_session: the group id is the child's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(5)

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_for(pred, timeout: float, what: str, procs: list[Proc] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited while waiting for {what}:\n{p.tail()}")
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def http_get_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return 200 <= r.status < 300


def chat_ok(base: str) -> bool:
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(BODY).encode(),
                                 headers={"content-type": "application/json",
                                          "authorization": "Bearer sk-bench"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            body = json.loads(r.read())
            return r.status == 200 and body.get("object") == "chat.completion"
    except urllib.error.HTTPError:
        return False


# --------------------------------------------------------------------------- wrk


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found; installing with scripts/ensure-debs.sh wrk", flush=True)
    subprocess.run(["bash", str(ENSURE_DEBS), "wrk"], check=False)
    found = shutil.which("wrk")
    if not found:
        sys.exit("wrk is required (Debian package `wrk`) and could not be installed")
    return found


def run_wrk(wrk: str, url: str, connections: int, duration: float, threads: int,
            stream: bool = False) -> dict:
    threads = max(1, min(threads, connections))
    env = dict(os.environ, BENCH_MODEL=MODEL_ALIAS, BENCH_STREAM="1" if stream else "0")
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, int(round(duration)))}s",
           "--timeout", "10s", "--latency", "-s", str(WRK_LUA), url]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=duration + 60, stdin=subprocess.DEVNULL)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    res = json.loads(line[len("WRK_JSON "):])
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6) if res["duration_us"] else 0.0
    res["errors"] = sum(res[k] for k in ("errors_connect", "errors_read", "errors_write",
                                         "errors_status", "errors_timeout"))
    res["connections"] = connections
    res["threads"] = threads
    res["command"] = shlex.join(cmd)
    return res


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    key: str
    title: str
    url: str = ""
    procs: list[Proc] = field(default_factory=list)
    skipped: str | None = None
    results: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cpu_pids: list[int] = field(default_factory=list)  # service workers: CPU per worker is reported

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def start_envoy(config: Path, work: Path, name: str, admin_port: int, concurrency: int,
                extra: list[Proc]) -> Proc:
    envoy = Proc(name, [envoy_binary(), "-c", str(config), "--use-dynamic-base-id",
                        "--log-level", "warn", "--concurrency", str(concurrency),
                        "--disable-hot-restart"], work / "logs" / f"{name}.log").start()
    wait_for(lambda: http_get_ok(f"http://127.0.0.1:{admin_port}/ready"), 30, f"{name} ready",
             [envoy, *extra])
    return envoy


def render(src: Path, dest: Path, *, listen: int, admin: int, extproc: int, stub: int) -> Path:
    return write_envoy_config(src, dest, listen_port=listen, admin_port=admin,
                              extproc_port=extproc, triton_port=stub, passthrough_port=stub)


def case_stub(args, work: Path, stub_port: int) -> Case:
    return Case("stub", "stub upstream alone (no proxy)", url=f"http://127.0.0.1:{stub_port}")


def case_a(args, work: Path, stub_port: int) -> Case:
    c = Case("a", "Envoy without ext_proc -> stub")
    listen, admin = free_port(), free_port()
    cfg = render(ROOT / "envoy" / "envoy-nofilter.yaml", work / "envoy-nofilter.yaml",
                 listen=listen, admin=admin, extproc=free_port(), stub=stub_port)
    c.procs.append(start_envoy(cfg, work, "envoy-nofilter", admin, args.envoy_concurrency, []))
    c.url = f"http://127.0.0.1:{listen}"
    return c


def extproc_config(work: Path, workers: int, plugins: list[str]) -> Path:
    """The embedded default configuration (its tiers and its plugins, in order) plus the stub as
    tier `passthrough` (alias `stub`); ``plugins`` replaces the plugin list when given."""
    import yaml

    from extproc.framework.config import default_config_text

    cfg = yaml.safe_load(default_config_text())
    cfg["server"].update({"host": "127.0.0.1", "workers": workers, "log_level": "warning"})
    cfg["tiers"]["passthrough"] = {"model": UPSTREAM_MODEL, "kind": "openai",
                                   "cluster": "tier_passthrough", "aliases": [MODEL_ALIAS]}
    if plugins:
        cfg["plugins"] = [{"name": p} for p in plugins]
    path = work / "extproc-bench.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def grpc_serving(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return resp.status == health_pb2.HealthCheckResponse.SERVING


def case_b(args, work: Path, stub_port: int) -> Case:
    c = Case("b", "Envoy + ext_proc service -> stub (tier passthrough)")
    bindir = Path(sys.executable).parent
    config = Path(args.extproc_config) if args.extproc_config else \
        extproc_config(work, args.extproc_workers, [p for p in args.plugins.split(",") if p])
    port = free_port()
    cmd = args.extproc_cmd.format(bindir=bindir, config=config, port=port,
                                  workers=args.extproc_workers, python=sys.executable)
    sockets = None
    if args.extproc_sockets:
        from extproc.serving.server import worker_socket_paths

        cmd += f" --worker-sockets {shlex.quote(str(work / 'sockets'))}"
        sockets = worker_socket_paths(work / "sockets", args.extproc_workers)
        c.title = "Envoy + ext_proc -> stub, a Unix socket per worker"
    argv = shlex.split(cmd)
    exe = shutil.which(argv[0]) or (argv[0] if Path(argv[0]).exists() else None)
    if exe is None:
        c.skipped = f"service command not found: {argv[0]} (from --extproc-cmd {args.extproc_cmd!r})"
        return c
    svc = Proc("extproc", argv, work / "logs" / "extproc.log").start()
    c.procs.append(svc)
    wait_for(lambda: grpc_serving(port), 60, "ext_proc service SERVING", [svc])
    listen, admin = free_port(), free_port()
    cfg = write_envoy_config(ROOT / "envoy" / "envoy.yaml", work / "envoy.yaml", listen_port=listen,
                             admin_port=admin, extproc_port=port, triton_port=stub_port,
                             passthrough_port=stub_port, extproc_sockets=sockets)
    c.procs.append(start_envoy(cfg, work, "envoy", admin, args.envoy_concurrency, [svc]))
    c.url = f"http://127.0.0.1:{listen}"
    # The extproc cluster is health checked: wait until a request really passes.
    wait_for(lambda: chat_ok(c.url), 30, "a chat completion through Envoy + ext_proc", c.procs)
    c.notes.append(f"service: {cmd}")
    c.cpu_pids = service_workers(svc.popen.pid)
    return c


def service_workers(pid: int) -> list[int]:
    """The worker processes of `extproc serve` (its multiprocessing children, not the resource
    tracker); [] if they cannot be told (another --extproc-cmd, say)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if ppid == pid and "spawn_main" in cmdline:
            out.append(int(d.name))
    if not out:  # e.g. `env ... python -m extproc serve`: one more process in between
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out += service_workers(int(d.name))
            except (OSError, ValueError):
                continue
    return sorted(out)


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find_litellm(args) -> tuple[str | None, str]:
    """(litellm executable, how it was found) -- or (None, reason)."""
    try:
        import litellm  # noqa: F401

        exe = Path(sys.executable).parent / "litellm"
        if exe.exists():
            return str(exe), "importable in this interpreter"
    except ImportError:
        pass
    venv = Path(args.litellm_venv)
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return str(exe), f"from {venv}"
    if args.no_install:
        return None, f"litellm not importable and {exe} missing (--no-install given)"
    print(f"installing litellm[proxy] into {venv} from PyPI (one-off) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        "litellm[proxy]"], check=True, timeout=1200)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        return None, f"could not install litellm[proxy] into {venv}: {err}"
    if exe.exists():
        return str(exe), f"installed into {venv}"
    return None, f"{exe} missing after installing litellm[proxy]"


def case_c(args, work: Path, stub_port: int) -> Case:
    c = Case("c", "LiteLLM proxy (1 worker) -> stub")
    exe, how = find_litellm(args)
    if exe is None:
        c.skipped = how
        return c
    import yaml

    cfg = {
        "model_list": [{"model_name": MODEL_ALIAS, "litellm_params": {
            "model": f"openai/{UPSTREAM_MODEL}", "api_base": f"http://127.0.0.1:{stub_port}/v1",
            "api_key": "sk-stub"}}],
        "litellm_settings": {"drop_params": True, "telemetry": False},
        # Recent LiteLLM refuses to start without a master key; requests carry it (chat.lua).
        "general_settings": {"master_key": "sk-bench"},
    }
    path = work / "litellm.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    port = free_port()
    env = dict(os.environ, LITELLM_TELEMETRY="False", LITELLM_LOG="ERROR",
               DISABLE_ADMIN_UI="True", NO_DOCS="True")
    env.pop("DATABASE_URL", None)
    proc = Proc("litellm", [exe, "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
                            "--num_workers", "1"], work / "logs" / "litellm.log", env=env).start()
    c.procs.append(proc)
    c.url = f"http://127.0.0.1:{port}"
    wait_for(lambda: chat_ok(c.url), 180, "a chat completion through LiteLLM", [proc])
    version = subprocess.run([str(Path(exe).parent / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True).stdout.strip()
    c.notes.append(f"litellm {version} ({how})")
    return c


CASES = {"stub": case_stub, "a": case_a, "b": case_b, "c": case_c}
TITLES = {"stub": "stub upstream alone (no proxy)", "a": "Envoy without ext_proc -> stub",
          "b": "Envoy + ext_proc service -> stub (tier passthrough)",
          "c": "LiteLLM proxy (1 worker) -> stub"}


# --------------------------------------------------------------------------- main


def fmt_ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def print_table(cases: list[Case], args) -> None:
    sat = args.saturation_connections
    print()
    print(f"{'case':<5} {'what':<52} {'p50@1':>7} {'p99@1':>7} {'p50@16':>7} {'p99@16':>7} "
          f"{'rps@1':>7} {'rps@16':>7} {f'rps@{sat}':>8} {'errors':>6}")
    print("-" * 120)
    for c in cases:
        if c.skipped:
            print(f"{c.key:<5} {c.title:<52} SKIPPED: {c.skipped}")
            continue
        r1, r16, rs = (c.results.get(k) for k in ("c1", "c16", "sat"))
        errs = sum(r["errors"] for r in (r1, r16, rs) if r)
        cell = lambda r, k: fmt_ms(r[k]) if r else "-"  # noqa: E731
        rate = lambda r: f"{r['rps']:.0f}" if r else "-"  # noqa: E731
        print(f"{c.key:<5} {c.title:<52} {cell(r1, 'p50_us'):>7} {cell(r1, 'p99_us'):>7} "
              f"{cell(r16, 'p50_us'):>7} {cell(r16, 'p99_us'):>7} {rate(r1):>7} {rate(r16):>7} "
              f"{rate(rs):>8} {errs:>6}")
    print("(latencies in ms)")
    by = {c.key: c for c in cases if not c.skipped}
    if "a" in by and "b" in by:
        a, b = by["a"].results, by["b"].results
        print("\next_proc hop (b - a): "
              f"p50@1 +{(b['c1']['p50_us'] - a['c1']['p50_us']) / 1000:.2f} ms, "
              f"p99@1 +{(b['c1']['p99_us'] - a['c1']['p99_us']) / 1000:.2f} ms, "
              f"p50@16 +{(b['c16']['p50_us'] - a['c16']['p50_us']) / 1000:.2f} ms, "
              f"saturation {b['sat']['rps']:.0f} vs {a['sat']['rps']:.0f} req/s")
    for c in cases:
        for n in c.notes:
            print(f"note [{c.key}]: {n}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="stub,a,b,c", help="comma list of: stub,a,b,c")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per case")
    ap.add_argument("--saturation-connections", type=int, default=64)
    ap.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (capped by connections)")
    ap.add_argument("--envoy-concurrency", type=int, default=2, help="Envoy worker threads")
    ap.add_argument("--stub-workers", type=int, default=1)
    ap.add_argument("--stream", action="store_true", help='measure "stream": true requests')
    ap.add_argument("--extproc-cmd", default=DEFAULT_EXTPROC_CMD,
                    help="service start command; placeholders {bindir} {python} {config} {port} {workers}")
    ap.add_argument("--extproc-config", help="service config (default: generated, tier passthrough -> stub)")
    ap.add_argument("--extproc-workers", type=int, default=2)
    ap.add_argument("--extproc-sockets", action="store_true",
                    help="one Unix socket per service worker (server.worker_sockets), each an Envoy "
                         "endpoint, instead of one SO_REUSEPORT TCP port")
    ap.add_argument("--plugins", default="",
                    help="comma-separated plugins for the service instead of the default config's")
    ap.add_argument("--litellm-venv", default="/tmp/litellm-venv")
    ap.add_argument("--no-install", action="store_true", help="never pip-install litellm")
    ap.add_argument("--work-dir", help="logs and rendered configs (default: a temp dir)")
    ap.add_argument("--out", help="write all results as JSON here")
    args = ap.parse_args(argv)

    wanted = [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in CASES]
    if unknown:
        ap.error(f"unknown case(s): {', '.join(unknown)}")
    wrk = ensure_wrk()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-hop-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}  (logs in {work / 'logs'})", flush=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other work on "
          f"the machine skews results); everything on 127.0.0.1; {args.duration:.0f}s per "
          f"measurement", flush=True)

    stub_port = free_port()
    stub = Proc("stub", [sys.executable, str(STUB), "--port", str(stub_port),
                         "--workers", str(args.stub_workers)], work / "logs" / "stub.log").start()
    done: list[Case] = []
    try:
        wait_for(lambda: http_get_ok(f"http://127.0.0.1:{stub_port}/health"), 20, "stub", [stub])
        for key in wanted:
            case: Case | None = None
            print(f"\n== case {key} ==", flush=True)
            try:
                case = CASES[key](args, work, stub_port)
                if case.skipped:
                    print(f"SKIPPED: {case.skipped}", flush=True)
                    done.append(case)
                    continue
                if not chat_ok(case.url):
                    raise RuntimeError(f"no 200 chat.completion from {case.url}")
                if args.warmup > 0:
                    run_wrk(wrk, case.url, 16, args.warmup, args.wrk_threads, args.stream)
                for label, conns in (("c1", 1), ("c16", 16), ("sat", args.saturation_connections)):
                    cpu0 = [cpu_seconds(p) for p in case.cpu_pids]
                    res = run_wrk(wrk, case.url, conns, args.duration, args.wrk_threads, args.stream)
                    if case.cpu_pids:
                        res["worker_cpu_s"] = [round(cpu_seconds(p) - c, 2) for p, c in zip(case.cpu_pids, cpu0)]
                        if label == "sat":  # SO_REUSEPORT can put all of Envoy's connections on one worker
                            case.notes.append(f"CPU seconds per service worker at {conns} connections "
                                              f"({args.duration:.0f} s): {', '.join(map(str, res['worker_cpu_s']))}")
                    case.results[label] = res
                    print(f"  {conns:>3} conns: p50 {fmt_ms(res['p50_us'])} ms  p99 "
                          f"{fmt_ms(res['p99_us'])} ms  {res['rps']:.0f} req/s  errors {res['errors']}"
                          f"   [{res['command']}]", flush=True)
                case.notes.append(f"load average after: {os.getloadavg()[0]:.2f}")
                done.append(case)
            except Exception as err:  # noqa: BLE001 - report and go on with the next case
                tails = "\n".join(f"--- {p.name} log:\n{p.tail()}" for p in (case.procs if case else []))
                reason = f"{type(err).__name__}: {err}"
                print(f"FAILED: {reason}\n{tails}", flush=True)
                failed = case or Case(key, TITLES[key])
                failed.skipped = f"failed: {reason.splitlines()[0]}"
                done.append(failed)
            finally:
                if case is not None:
                    case.stop()
    finally:
        stub.stop()

    print_table(done, args)
    if args.out:
        payload = {
            "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
            "settings": {k: v for k, v in vars(args).items()},
            "cases": [{"key": c.key, "title": c.title, "skipped": c.skipped, "notes": c.notes,
                       "results": c.results} for c in done],
        }
        Path(args.out).write_text(json.dumps(payload, indent=2))
        print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
