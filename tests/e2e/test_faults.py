"""The fault suite: parts of a running stack fail under a steady load from the test itself.

Each case runs `extproc up` (Redis, Triton, the service with two workers, Envoy, all supervised),
keeps >= 50 requests a second going, breaks one part, and asserts what the clients saw: every
request answered, or failed fast with an OpenAI-style error and a 5xx; none hung; traffic back to
normal after the part recovered. Each case prints its counts (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from ..conftest import free_port
from .load import LoadReport, SteadyLoad
from .test_up_command import leftovers, start_up
from .test_up_supervision import pgrep, service_pid, until

pytestmark = pytest.mark.e2e

RATE = 60  # requests a second


def workers_of(pid: int) -> set[int]:
    """The worker processes of an `extproc serve` parent."""
    try:
        children = {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()
    out = set()
    for c in children:
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing.spawn" in cmd and b"resource_tracker" not in cmd:
            out.add(c)
    return out


def base_url(ports: dict) -> str:
    return f"http://127.0.0.1:{ports['listen']}/v1"


def check(report: LoadReport, name: str) -> None:
    """What holds in every case: nothing hung, every failure a 5xx with an OpenAI-style body."""
    print(f"\n[{name}] {report.summary()}")
    assert report.sent >= RATE * report.sending * 0.8, report.summary()  # the load really ran
    assert report.hung == 0, report.summary()
    bad = [o for o in report.failed if o.status is None or o.status < 500 or not o.openai_error]
    assert not bad, [(o.status, o.error) for o in bad[:5]]


def config_file(tmp_path: Path, plugins: str) -> Path:
    from importlib import resources

    cfg = yaml.safe_load((resources.files("extproc.framework") / "default_config.yaml").read_text())
    cfg["plugins"] = yaml.safe_load(textwrap.dedent(plugins))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def up(tmp_path):
    """`extproc up` with two workers; yields (process, ports); stopped and checked for leftovers."""
    started = []

    def start(*extra: str):
        proc, ports, banner = start_up(tmp_path, "--workers", "2", *extra)
        assert "llm-extproc is up" in banner, banner
        started.append((proc, ports))
        return proc, ports

    yield start
    for proc, ports in started:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        print("  extproc up said:", " | ".join(line for line in out.splitlines() if line.startswith("extproc up:")))
        assert proc.returncode == 0
        assert until(lambda: leftovers(tmp_path, ports) == [], 15), leftovers(tmp_path, ports)


def test_kill_9_one_worker(up):
    proc, ports = up()
    service = service_pid(ports)
    before = until(lambda: workers_of(service) if len(workers_of(service)) == 2 else None, 10)
    victim = min(before)
    with SteadyLoad(base_url(ports), rate=RATE) as load:
        time.sleep(4)
        killed_at = load.elapsed()
        os.kill(victim, signal.SIGKILL)
        time.sleep(8)
    report = load.stop()
    check(report, "kill -9 one worker")
    # Only what was in flight on it (and what Envoy had already put on its connection) failed,
    # within a moment of the kill; everything after was answered.
    assert len(report.failed) <= 15, report.summary()
    assert all(killed_at - 0.5 <= o.sent_at <= killed_at + 1.5 for o in report.failed), \
        [(o.sent_at, o.status) for o in report.failed]
    assert report.between(killed_at + 1.5, report.duration).answered == report.between(
        killed_at + 1.5, report.duration).sent
    after = until(lambda: workers_of(service) if len(workers_of(service)) == 2 else None, 10)
    assert after and victim not in after  # replaced; the service itself never stopped
    assert service_pid(ports) == service


def test_rolling_restart_of_the_service_loses_nothing(up, tmp_path):
    proc, ports = up()
    first = service_pid(ports)
    cmdline = Path(f"/proc/{first}/cmdline").read_bytes().split(b"\0")[:-1]
    with SteadyLoad(base_url(ports), rate=RATE) as load:
        time.sleep(2)
        # A second instance on the same port (SO_REUSEPORT), as Kubernetes would start the new
        # pod before stopping the old one; then the old one gets SIGTERM and drains.
        args = [c.decode() for c in cmdline]
        if "--metrics-port" in args:  # its own metrics port, as a pod has
            args[args.index("--metrics-port") + 1] = str(free_port())
        log = open(tmp_path / "second-service.log", "wb")
        second = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # Serving once every one of its workers is (its parent logs it): a slow machine takes
            # several seconds to import and start them, and a fixed sleep was too short on CI.
            assert until(lambda: b"ext_proc service ready" in (tmp_path / "second-service.log").read_bytes(), 60), \
                (tmp_path / "second-service.log").read_text()[-2000:]
            time.sleep(1)
            os.kill(first, signal.SIGTERM)
            time.sleep(8)
        finally:
            report = load.stop()
            second.send_signal(signal.SIGTERM)
            second.wait(30)
            log.close()
    check(report, "rolling restart (SIGTERM with a second instance)")
    assert report.answered == report.sent, (report.summary(), [(round(o.sent_at, 2), o.error) for o in report.failed])


def test_sigstop_the_service_for_5_seconds(up):
    proc, ports = up()
    group = os.getpgid(service_pid(ports))
    with SteadyLoad(base_url(ports), rate=RATE, timeout=10) as load:
        time.sleep(2)
        stopped_at = load.elapsed()
        os.killpg(group, signal.SIGSTOP)
        try:
            time.sleep(5)
        finally:
            os.killpg(group, signal.SIGCONT)
        resumed_at = load.elapsed()
        time.sleep(6)
    report = load.stop()
    check(report, "SIGSTOP of the service for 5 s")
    assert report.failed, "a stopped service cannot answer"
    assert max(o.seconds for o in report.failed) < 4.0  # Envoy's ext_proc timeout, not the client's
    late = report.between(resumed_at + 2.5, report.duration)
    assert late.answered == late.sent, late.summary()  # traffic recovers on SIGCONT
    assert stopped_at < resumed_at


def test_kill_triton_then_a_model_process(up, tmp_path):
    proc, ports = up()
    marks = {}
    # Known limit: with the model process dead, Triton holds some requests for seconds (until the
    # reload fails them over) instead of answering at once; hence a 20 s client timeout here.
    with SteadyLoad(base_url(ports), rate=RATE, timeout=20) as load:
        time.sleep(2)
        triton = pgrep(f"^[^ ]*/bin/tritonserver .*{tmp_path}")
        os.kill(int(triton[0]), signal.SIGKILL)
        marks["Triton killed"] = load.elapsed()
        back = until(lambda: load.elapsed() > marks["Triton killed"] + 3 and recent_all_ok(load), 60)
        marks["Triton back"] = load.elapsed()
        stub = pgrep(f"{tmp_path}/triton/backends/python/triton_python_backend_stub .*llm-small")
        os.kill(int(stub[0]), signal.SIGKILL)
        marks["model process killed"] = load.elapsed()
        reloaded = until(lambda: load.elapsed() > marks["model process killed"] + 3 and recent_all_ok(load), 60)
        marks["model back"] = load.elapsed()
        time.sleep(2)
    report = load.stop()
    print("\n  " + ", ".join(f"{k} at {v:.1f} s" for k, v in marks.items()),
          "; hung ones sent at", sorted({round(o.sent_at, 1) for o in report.outcomes if o.hung}))
    check(report, "kill -9 Triton, then the small tier's model process")
    print(f"  slowest failure {max(o.seconds for o in report.failed):.1f} s")
    assert back and reloaded
    assert {o.status for o in report.failed} <= {502, 503, 504}


def test_a_model_process_killed_mid_answer_is_a_504_not_a_hang(up, tmp_path):
    """Triton's Python backend never ends a request whose model process died while generating it
    (triton-inference-server/server#7862): the client would wait for the route's 600 s. The gateway
    streams from Triton even for a non-streaming client, so Envoy sees an idle upstream and answers
    504 (the Triton routes' per_try_idle_timeout, 30 s)."""
    import concurrent.futures

    import httpx

    proc, ports = up("--models", "llm-small,llm-large")  # large: slow enough to be killed mid-answer
    pattern = f"{tmp_path}/triton/backends/python/triton_python_backend_stub .*llm-large"
    body = {"model": "large", "max_tokens": 800, "messages": [{"role": "user", "content": "tell me a long story"}]}

    def ask():
        t0 = time.monotonic()
        r = httpx.post(base_url(ports) + "/chat/completions", json=body, timeout=90)
        return r, time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(ask)
        time.sleep(1.5)  # generating by now (about 100 tokens a second on this CPU model)
        stub = pgrep(pattern)
        os.kill(int(stub[0]), signal.SIGKILL)
        r, waited = answer.result()
    print(f"\n  model process killed mid-answer: {r.status_code} after {waited:.1f} s: {r.text[:160]}")
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert waited < 45


def recent_all_ok(load: SteadyLoad, seconds: float = 1.0) -> bool:
    """Every request answered in the last ``seconds`` of those that have ended was a 200."""
    done = list(load.report.outcomes)
    recent = [o for o in done if o.sent_at >= load.elapsed() - seconds - 1.0]
    return len(recent) >= RATE * seconds * 0.5 and all(o.status == 200 for o in recent)


def test_redis_killed_and_back_caches_degrade_to_misses(up, tmp_path):
    config = config_file(tmp_path, """
        - name: model_tiers
        - name: exact_cache
          on_error: fail_open
          settings: {ttl: {default_seconds: 3600}}
        - name: coalescing
          on_error: fail_open
        - name: metrics
    """)
    proc, ports = up("--config", str(config))
    same = lambda i: {"model": "small", "max_tokens": 2, "temperature": 0,  # noqa: E731
                      "messages": [{"role": "user", "content": f"cached {i % 20}"}]}
    with SteadyLoad(base_url(ports), rate=RATE, body=same) as load:
        time.sleep(3)
        redis = pgrep(f"redis-server .*{tmp_path}")
        os.kill(int(redis[0]), signal.SIGKILL)
        time.sleep(6)  # up restarts it after 1 s; the caches miss meanwhile
    report = load.stop()
    check(report, "Redis killed and restarted (caches only)")
    assert report.answered == report.sent, report.summary()


def test_redis_killed_and_back_budgets_reject_then_spend_is_exact(up, tmp_path):
    config = config_file(tmp_path, """
        - name: budgets
          settings:
            on_store_unavailable: reject
            leases: {enabled: "off"}
            tenants: {anonymous: {tokens_per_day: 100000000}}
        - name: model_tiers
        - name: metrics
    """)
    proc, ports = up("--config", str(config))
    with SteadyLoad(base_url(ports), rate=RATE) as load:
        time.sleep(3)
        redis = pgrep(f"redis-server .*{tmp_path}")
        os.kill(int(redis[0]), signal.SIGKILL)
        time.sleep(6)
    report = load.stop()
    check(report, "Redis killed and restarted (budgets, on_store_unavailable: reject)")
    codes = {o.error[:200] for o in report.failed}
    assert all(o.status == 503 and "budget_unavailable" in o.error for o in report.failed), codes
    answered_tokens = sum(o_tokens for o_tokens in _answered_tokens(report))
    spent = asyncio.run(_spent(f"unix://{tmp_path}/redis/redis.sock"))
    print(f"  spend {spent} tokens = sum of the answered requests' usage {answered_tokens}")
    assert spent == answered_tokens


def _answered_tokens(report: LoadReport):
    for o in report.outcomes:
        if o.status == 200:
            yield o.tokens


async def _spent(url: str) -> int:
    from extproc.state.redis_store import RedisStore
    from extproc_plugins.budgets.ledger import BudgetLedger, Subject

    store = RedisStore(url)
    try:
        ledger = BudgetLedger(store)
        deadline = time.monotonic() + 15
        while True:
            rows = (await ledger.report(Subject("tenant", "anonymous")))["windows"]
            row = next(r for r in rows if (r["metric"], r["window"]) == ("tokens", "day"))
            if row["reserved"] == 0 or time.monotonic() > deadline:
                return row["spent"]
            await asyncio.sleep(0.2)
    finally:
        await store.close()
