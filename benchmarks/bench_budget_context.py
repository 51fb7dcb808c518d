"""Added latency of the budget and context policies, at 1 and 16 concurrent clients.

Runs in-process against Redis on loopback (127.0.0.1:6379 by default, keys under a prefix of this
run, deleted at the end; ``--redis-url own`` starts a redis-server of its own) and the memory
store, timing each policy's request-path hook the way the gateway calls it:

* ``budgets admission``: ``extproc_request_parsed`` (token estimate + one atomic Lua reservation
  over the tenant's counters: 3 limited + tracked windows, one round trip), target p50 < 0.3 ms
  on Redis;
* ``budgets reconcile``: ``extproc_response_complete``: what the response path waits for (queueing
  the settlement), then how long until every queued reconcile landed in the store (background);
* ``tenancy``: API key lookup (HMAC + in-process cache; and uncached, one Redis GET);
* ``context_caps``: a 300-token chat under the cap (count only), and a 50,000-token prompt cut to
  1,000 tokens by ``trim_middle`` and ``drop_oldest``;
* ``retrieval``: 2 documents / ~24 chunks ranked against the question, embeddings cached in the
  store (the common case of re-sent documents) and uncached (MiniLM runs).

* ``gateway``: the whole ``budgets`` plugin through Envoy and the service (wrk against a stub
  upstream, the default plugins, with and without ``budgets``, both on the same Redis): the p50
  and p99 it adds at 1 and 16 connections.

    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_budget_context.py [--requests 2000] [--clients 1,16]
        [--cases budgets,gateway] [--redis-url redis://127.0.0.1:6379/0 | own]

Clients are coroutines in one event loop (the way one gateway worker serves concurrent streams);
with 16 the figures include waiting for the loop and for Redis. Bounded: a few thousand
operations per case, well under a minute or two in all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: another checkout may be measured

from extproc_plugins.tenancy.api_keys import KeyRing  # noqa: E402
from extproc.framework.config import PluginEntry, load_config  # noqa: E402
from extproc.framework.context import RequestContext  # noqa: E402
from extproc.framework.gateway import Gateway  # noqa: E402
from extproc.formats.openai import Usage, parse_request  # noqa: E402

PEPPER = "bench-pepper-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis() -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is needed (apt-get install redis-server)")
    port = free_port()
    work = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", work], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("redis-server did not start")


def hiredis_available() -> bool:
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return False
    return bool(HIREDIS_AVAILABLE)


async def delete_bench_keys(url: str) -> None:
    """Delete this run's keys (every gateway here uses the prefix ``bench<pid>:``)."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    try:
        batch = []
        async for key in client.scan_iter(match=f"bench{os.getpid()}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch = []
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


def gateway(plugins: list[dict], redis_url: str | None) -> Gateway:
    cfg = load_config(None)
    cfg = cfg.model_copy(update={
        "plugins": [PluginEntry(**p) for p in plugins] + [PluginEntry(name="model_tiers")],
        "server": cfg.server.model_copy(update={"workers": 1}),
        "state": cfg.state.model_copy(update={"redis_url": redis_url, "key_prefix": f"bench{os.getpid()}:"}),
    })
    return Gateway(cfg)


def ctx_for(body: dict, tenant: str = "acme", headers: dict | None = None) -> RequestContext:
    ctx = RequestContext("bench", "POST", "/v1/chat/completions", headers or {}, endpoint="chat", tenant=tenant)
    ctx.request = parse_request("chat", json.dumps(body).encode())
    return ctx


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


async def measure(op, n: int, clients: int, warmup: int = 50) -> list[float]:
    """Run ``op(i)`` n times over ``clients`` coroutines; the per-call latencies in ms."""
    warm = iter(range(warmup))

    async def warm_worker():  # as many at once as measured: the connection pool is warm too
        for i in warm:
            await op(-1 - i)

    await asyncio.gather(*[warm_worker() for _ in range(clients)])
    out: list[float] = []
    counter = iter(range(n))

    async def worker():
        for i in counter:
            t = time.perf_counter()
            await op(i)
            out.append((time.perf_counter() - t) * 1000.0)
            await asyncio.sleep(0)  # a client does other things between requests (untimed): let the others run

    await asyncio.gather(*[worker() for _ in range(clients)])
    return out


def row(name: str, clients: int, ms: list[float]) -> None:
    print(f"| {name:<44} | {clients:>2} | {statistics.median(ms):8.3f} | {pct(ms, 0.9):8.3f} | "
          f"{pct(ms, 0.99):8.3f} | {len(ms):>5} |", flush=True)


CHAT = {"model": "auto", "max_tokens": 16, "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": " ".join(f"word{i}" for i in range(140))}]}


BUDGET_LIMITS = {"tokens_per_minute": 10**12, "tokens_per_day": 10**12, "usd_per_month": 10**6}


async def bench_budgets(store_name: str, redis_url: str | None, n: int, client_counts: list[int]) -> None:
    gw = gateway([{"name": "budgets", "settings": {"tenants": {"acme": BUDGET_LIMITS}, "track": {"tenant": ["day", "month"]}}}],
                 redis_url)
    await gw.start()
    plugin = gw.hooks.pm.get_plugin("budgets")
    try:
        for clients in client_counts:
            # The requests are parsed beforehand: only the hook is timed (parsing is the gateway's).
            contexts = {}
            for i in range(-60, n):
                ctx = contexts[i] = ctx_for(CHAT)
                ctx.prompt_tokens_estimate = 160  # set by context_caps when it runs first
            admitted: dict[int, RequestContext] = {}

            async def admit(i):
                ctx = contexts.pop(i)
                await plugin.extproc_request_parsed(ctx)
                admitted[i] = ctx

            ms = await measure(admit, n, clients)
            row(f"budgets admission ({store_name})", clients, ms)
            for ctx in admitted.values():
                ctx.usage = Usage(160, 16)
                ctx.cost_usd = 0.00002
                ctx.outcome = "completed"

            async def reconcile(i):
                ctx = admitted.pop(i) if i in admitted else admitted.popitem()[1]
                await plugin.extproc_response_complete(ctx)

            started = time.perf_counter()
            ms = await measure(reconcile, min(n, len(admitted) - 50), clients)  # warm-up settles 50 too
            row(f"budgets reconcile, on the response path ({store_name})", clients, ms)
            if hasattr(plugin, "settled"):  # (an older checkout reconciles inline)
                await plugin.settled()  # every reconcile queued in the background has reached the store
            landed = (time.perf_counter() - started) * 1000.0
            print(f"|   ({len(ms) + 50} reconciles queued and all landed in the store in {landed:.0f} ms: "
                  f"{(len(ms) + 50) / landed * 1000:,.0f}/s) | | | | | |", flush=True)
            for ctx in list(admitted.values()):
                ctx.outcome = "aborted"
                await plugin.extproc_request_finished(ctx)
            admitted.clear()
            if hasattr(plugin, "settled"):
                await plugin.settled()
    finally:
        await gw.stop()


async def bench_tenancy(redis_url: str, n: int, client_counts: list[int]) -> None:
    os.environ["EXTPROC_KEY_PEPPER"] = PEPPER
    gw = gateway([{"name": "tenancy", "settings": {"cache_seconds": 5}}], redis_url)
    await gw.start()
    plugin = gw.hooks.pm.get_plugin("tenancy")
    _, key = await KeyRing(gw.store, PEPPER.encode()).create("acme")
    try:
        for clients in client_counts:
            async def cached(i):
                await plugin.extproc_request_headers(ctx_for(CHAT, headers={"authorization": f"Bearer {key}"}))

            row("tenancy key lookup (cached)", clients, await measure(cached, n, clients))

            async def uncached(i):
                plugin.ring._cache.clear()
                await plugin.extproc_request_headers(ctx_for(CHAT, headers={"authorization": f"Bearer {key}"}))

            row("tenancy key lookup (Redis GET)", clients, await measure(uncached, n, clients))
    finally:
        await gw.stop()


async def bench_context(n: int, client_counts: list[int]) -> None:
    rules = [{"tenants": ["trim"], "max_prompt_tokens": 1000, "strategy": "trim_middle"},
             {"tenants": ["drop"], "max_prompt_tokens": 1000, "strategy": "drop_oldest"},
             {"max_prompt_tokens": 4000, "strategy": "reject"}]
    gw = gateway([{"name": "context_caps", "settings": {"rules": rules}}], None)
    await gw.start()
    plugin = gw.hooks.pm.get_plugin("context_caps")
    big = " ".join(f"w{i % 997}" for i in range(25_000))  # 50,000 tokens (" w123" is two)
    turn = " ".join(f"w{i % 997}" for i in range(1_000))  # 2,000 tokens
    convo = {"model": "auto", "max_tokens": 16, "messages": [{"role": "system", "content": "Be brief."}] + [
        {"role": r, "content": f"{r} {i} {turn}"} for i in range(12) for r in ("user", "assistant")] + [
        {"role": "user", "content": "last?"}]}
    try:
        for clients in client_counts:
            async def small(i):
                await plugin.extproc_request_parsed(ctx_for(CHAT))

            row("context_caps, 160-token chat under the cap", clients, await measure(small, n, clients))
            body = {"model": "auto", "max_tokens": 16, "messages": [{"role": "user", "content": big}]}

            async def trim(i):
                await plugin.extproc_request_parsed(ctx_for(body, tenant="trim"))

            row("context_caps, 50k tokens -> 1k, trim_middle", clients, await measure(trim, max(20, n // 100), clients, 3))

            async def drop(i):
                await plugin.extproc_request_parsed(ctx_for(convo, tenant="drop"))

            row("context_caps, 48k-token chat -> 1k, drop_oldest", clients,
                await measure(drop, max(20, n // 100), clients, 3))
    finally:
        await gw.stop()


async def bench_retrieval(redis_url: str, n: int, client_counts: list[int]) -> None:
    gw = gateway([{"name": "retrieval", "settings": {"chunk_tokens": 64, "max_document_tokens": 400}}], redis_url)
    await gw.start()
    plugin = gw.hooks.pm.get_plugin("retrieval")
    paras = [f"Paragraph {i}: " + " ".join(f"topic{i}-{j}" for j in range(20)) for i in range(24)]
    docs = [{"id": "a", "text": "\n\n".join(paras[:12])}, {"id": "b", "text": "\n\n".join(paras[12:])}]

    def body(q):
        return {"model": "auto", "messages": [{"role": "user", "content": q}], "documents": docs}

    try:
        for clients in client_counts:
            async def cached(i):
                await plugin.extproc_request_parsed(ctx_for(body("what about topic7?")))

            row("retrieval, 24 chunks, embeddings cached", clients, await measure(cached, max(50, n // 10), clients, 3))

            async def fresh(i):
                gw.store  # a new question each time: only the question is embedded
                await plugin.extproc_request_parsed(ctx_for(body(f"question number {i} about topic{i % 24}?")))

            row("retrieval, 24 chunks, new question (1 embed)", clients,
                await measure(fresh, max(20, n // 50), clients, 3))

            async def uncached(i):  # every chunk new: all 24 chunks and the question go through MiniLM
                unique = [{"id": d["id"], "text": "\n\n".join(f"[run {i}/{clients}] {p}" for p in d["text"].split("\n\n"))}
                          for d in docs]
                await plugin.extproc_request_parsed(ctx_for(
                    {"model": "auto", "messages": [{"role": "user", "content": f"q {i}"}], "documents": unique}))

            row("retrieval, 24 chunks, nothing cached (MiniLM)", clients,
                await measure(uncached, max(4, n // 500), clients, 1))
    finally:
        await gw.stop()


def bench_gateway(redis_url: str, duration: float, client_counts: list[int], rounds: int, workers: int,
                  extproc_cmd: str | None = None) -> None:
    """Through Envoy and the service (``bench_extproc_hop.py`` case b: the default plugins, a stub
    upstream, wrk), with and without ``budgets`` (listed first, before routing; the same limits as
    above on the tenant ``anonymous``); both on the same Redis. Rounds alternate the two configs."""
    import types

    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_extproc_hop as hop

    wrk = hop.ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="bench-budgets-gw-"))
    stub_port = free_port()
    stub = hop.Proc("stub", [sys.executable, str(hop.STUB), "--port", str(stub_port), "--workers", "1"],
                    work / "logs" / "stub.log").start()
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        hop.wait_for(lambda: hop.http_get_ok(f"http://127.0.0.1:{stub_port}/health"), 20, "stub", [stub])
        for r in range(rounds):
            order = (("without budgets", False), ("with budgets", True))
            for label, with_budgets in (order if r % 2 == 0 else order[::-1]):  # ABBA: drift hits both
                cfg = yaml.safe_load(hop.extproc_config(work, workers, []).read_text())
                cfg["state"].update({"redis_url": redis_url, "key_prefix": f"bench{os.getpid()}:"})
                if with_budgets:
                    cfg["plugins"].insert(0, {"name": "budgets", "settings": {
                        "tenants": {"anonymous": BUDGET_LIMITS}, "track": {"tenant": ["day", "month"]}}})
                path = work / f"gateway-{'budgets' if with_budgets else 'plain'}.yaml"
                path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                args = types.SimpleNamespace(extproc_config=str(path), extproc_cmd=extproc_cmd or hop.DEFAULT_EXTPROC_CMD,
                                             extproc_workers=workers, envoy_concurrency=2, plugins="",
                                             extproc_sockets=False)
                case = hop.case_b(args, work, stub_port)
                try:
                    hop.run_wrk(wrk, case.url, 16, 2, 2)  # warm-up
                    for clients in client_counts:
                        res = hop.run_wrk(wrk, case.url, clients, duration, 2)
                        results.setdefault((label, clients), []).append(res)
                        print(f"|   round {r + 1}, {label}, {clients} connections: p50 {res['p50_us'] / 1000:.2f} ms, "
                              f"p99 {res['p99_us'] / 1000:.2f} ms, {res['rps']:.0f} req/s, errors {res['errors']} "
                              f"| | | | | |", flush=True)
                finally:
                    case.stop()
    finally:
        stub.stop()
        shutil.rmtree(work, ignore_errors=True)
    for clients in client_counts:
        plain = statistics.median(x["p50_us"] for x in results[("without budgets", clients)]) / 1000
        budgets = statistics.median(x["p50_us"] for x in results[("with budgets", clients)]) / 1000
        plain99 = statistics.median(x["p99_us"] for x in results[("without budgets", clients)]) / 1000
        budgets99 = statistics.median(x["p99_us"] for x in results[("with budgets", clients)]) / 1000
        print(f"| budgets plugin through the gateway: p50 {plain:.2f} -> {budgets:.2f} ms (+{budgets - plain:.2f}), "
              f"p99 {plain99:.2f} -> {budgets99:.2f} ms | {clients:>2} | {budgets - plain:+8.3f} | | "
              f"{budgets99 - plain99:+8.3f} | {rounds} x {duration:.0f} s |", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="operations per case")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--cases", default="budgets,memory,tenancy,context,retrieval,gateway",
                        help="comma list of: budgets (Redis), memory (budgets, memory store), tenancy, "
                             "context, retrieval, gateway (the budgets plugin through Envoy and the service)")
    parser.add_argument("--gateway-duration", type=float, default=8.0, help="seconds per wrk run (gateway case)")
    parser.add_argument("--gateway-rounds", type=int, default=2, help="alternating rounds (gateway case)")
    parser.add_argument("--gateway-workers", type=int, default=2, help="service workers (gateway case)")
    parser.add_argument("--gateway-extproc-cmd", help="service command (gateway case; bench_extproc_hop.py's "
                        "--extproc-cmd placeholders), e.g. 'env PYTHONPATH=/tmp/old {bindir}/extproc serve "
                        "--config {config} --port {port} --workers {workers}' to measure another checkout")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="Redis on loopback (keys under a prefix of this run, deleted at the end); "
                             "'own' starts a redis-server of its own")
    args = parser.parse_args()
    client_counts = [int(c) for c in args.clients.split(",")]
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    proc, url = (start_redis() if args.redis_url == "own" else (None, args.redis_url))
    try:
        print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores shared); Redis {url}; "
              f"hiredis parser: {hiredis_available()}")
        print("| case | clients | p50 ms | p90 ms | p99 ms | n |")
        print("|---|---:|---:|---:|---:|---:|")
        if "budgets" in cases:
            await bench_budgets("Redis, loopback", url, args.requests, client_counts)
        if "memory" in cases:
            await bench_budgets("memory", None, args.requests, client_counts)
        if "tenancy" in cases:
            await bench_tenancy(url, args.requests, client_counts)
        if "context" in cases:
            await bench_context(args.requests, client_counts)
        if "retrieval" in cases:
            await bench_retrieval(url, args.requests, client_counts)
        if "gateway" in cases:
            bench_gateway(url, args.gateway_duration, client_counts, args.gateway_rounds, args.gateway_workers,
                          args.gateway_extproc_cmd)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        await delete_bench_keys(url)
        if proc is not None:
            proc.terminate()
            proc.wait(5)


if __name__ == "__main__":
    asyncio.run(main())
