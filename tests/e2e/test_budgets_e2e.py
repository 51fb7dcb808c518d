"""Budgets and context discipline through real Envoy, Triton, Redis and the service.

Two gateways (the second sharing Triton and Redis) run ``budgets-e2e.yaml``: tenancy (API keys
from the admin API, plus Envoy's trusted header), retrieval, context caps, budgets, and the admin
API (gateway one, worker 0). A third gateway uses a Redis of this module's own with AOF fsync on
every write, which the durability test kills and restarts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import yaml

from extproc.formats import tokens
from extproc.formats.chat_templates import render
from extproc.formats.openai import ChatMessage
from extproc_plugins.admin.v1 import admin_pb2 as pb
from extproc_plugins.admin.v1 import admin_pb2_grpc as pb_grpc

from ..conftest import ROOT, free_port, require
from .conftest import model_requests
from ..redis_server import RedisServer

pytestmark = pytest.mark.e2e

CONFIG = ROOT / "tests" / "e2e" / "budgets-e2e.yaml"
PEPPER = "e2e-pepper-for-budgets-0123456789"
TOKEN = "e2e-admin-token-0123456789"
PRICE = {"small": (0.0001, 0.0002), "large": (0.003, 0.006)}


def write_config(path: Path, *, admin_port: int | None, redis_url: str | None = None) -> Path:
    cfg = yaml.safe_load(CONFIG.read_text())
    if admin_port is None:
        cfg["plugins"] = [p for p in cfg["plugins"] if p["name"] != "admin_api"]
    else:
        next(p for p in cfg["plugins"] if p["name"] == "admin_api")["settings"]["port"] = admin_port
    if redis_url:
        cfg["state"]["redis_url"] = redis_url
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def env():
    saved = {k: os.environ.get(k) for k in ("EXTPROC_E2E_BUDGET_PEPPER", "EXTPROC_E2E_ADMIN_TOKEN")}
    os.environ["EXTPROC_E2E_BUDGET_PEPPER"] = PEPPER
    os.environ["EXTPROC_E2E_ADMIN_TOKEN"] = TOKEN
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def gateways(env, stack, make_stack, tmp_path_factory):
    """Gateway one (2 workers, admin API) and gateway two (1 worker), sharing Triton and Redis."""
    work = tmp_path_factory.mktemp("budgets")
    admin_port = free_port()
    one = make_stack(write_config(work / "one.yaml", admin_port=admin_port), workers=2, share_triton_with=stack,
                     metrics_port=free_port())
    two = make_stack(write_config(work / "two.yaml", admin_port=None), workers=1, share_triton_with=stack)
    channel = grpc.insecure_channel(f"127.0.0.1:{admin_port}")
    admin = pb_grpc.AdminStub(channel)
    yield one, two, admin
    channel.close()


AUTH = [("authorization", f"Bearer {TOKEN}")]


def new_key(admin, tenant: str, workflow: str = "") -> str:
    return admin.CreateKey(pb.CreateKeyRequest(tenant=tenant, workflow=workflow), metadata=AUTH, timeout=5).api_key


def spend(admin, tenant: str) -> dict:
    info = admin.GetBudget(pb.GetBudgetRequest(subject=pb.Subject(scope=pb.TENANT, id=tenant)),
                           metadata=AUTH, timeout=5)
    return {(w.metric, w.window): w for w in info.windows}


def settled_spend(admin, tenant: str, timeout: float = 10.0) -> dict:
    """The tenant's rows once nothing is reserved any more: the gateway reconciles a request in the
    background after its answer went out, so the spend lands a moment after the client has it."""
    deadline = time.monotonic() + timeout
    while True:
        rows = spend(admin, tenant)
        if all(w.reserved == 0 for w in rows.values()) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def client(stack, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=60)


def cost_nano(tier: str, usage) -> int:
    pp, cp = PRICE[tier]
    return round((usage.prompt_tokens * pp + usage.completion_tokens * cp) / 1000.0 * 1e9)


def long_text(n_tokens: int) -> str:
    """About ``n_tokens`` cl100k tokens (each " w123" word is two)."""
    return " ".join(f"w{i % 997}" for i in range(n_tokens // 2 + 50))


# identity ---------------------------------------------------------------------------------------
def test_unknown_or_missing_key_is_401(gateways):
    one, _, _ = gateways
    with pytest.raises(openai.AuthenticationError) as err:
        client(one, "sk-ext-000000000000-not-a-real-key-at-all").chat.completions.create(
            model="small", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{one.base_url}/chat/completions", json={"model": "small", "messages": [
        {"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_spoofed_tenant_header_is_ignored(gateways):
    one, _, admin = gateways
    key = new_key(admin, "t-spoof-a")
    reply = client(one, key).chat.completions.create(
        model="small", max_tokens=2, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-extproc-tenant": "t-spoof-b", "x-extproc-workflow": "evil"})
    assert reply.usage.total_tokens > 0
    assert settled_spend(admin, "t-spoof-a")[("requests", "day")].spent == 1
    assert spend(admin, "t-spoof-b")[("requests", "day")].spent == 0
    # Without a key, the header alone (trusted_header is a configured source) does not get in:
    # Envoy strips every x-extproc-* header a client sends before the gateway sees the request.
    r = httpx.post(f"{one.base_url}/chat/completions", headers={"x-extproc-tenant": "t-spoof-b"},
                   json={"model": "small", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


# context caps -----------------------------------------------------------------------------------
def test_50k_token_prompt_under_each_strategy(gateways):
    one, _, admin = gateways
    text = long_text(50_000)
    assert tokens.count_text(text) >= 50_000

    with pytest.raises(openai.BadRequestError) as err:
        client(one, new_key(admin, "t-reject")).chat.completions.create(
            model="small", max_tokens=4, messages=[{"role": "user", "content": text}])
    assert err.value.body["code"] == "context_length_exceeded"

    turns = []
    chunk = long_text(2_000)
    for i in range(25):
        turns += [{"role": "user", "content": f"q{i} {chunk}"}, {"role": "assistant", "content": f"a{i} {chunk}"}]
    conversation = [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": "Last question?"}]
    assert sum(tokens.count_text(m["content"]) for m in conversation) > 50_000
    for tenant, messages in (("t-drop", conversation), ("t-trim", [{"role": "user", "content": text}])):
        raw = client(one, new_key(admin, tenant)).chat.completions.with_raw_response.create(
            model="small", max_tokens=4, messages=messages)
        reply = raw.parse()
        assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0
        # Triton counts the rendered chat template: the cap (1000) plus a few template tokens
        assert reply.usage.prompt_tokens <= 1000 + 16, tenant
        assert int(raw.headers["x-extproc-tokens-cut"]) >= 49_000, tenant


def test_documents_are_ranked_and_trimmed(gateways):
    one, _, admin = gateways
    filler = [f"Memo {i}: the cafeteria menu, parking permits and printer toner for floor {i}." for i in range(30)]
    answer = "The Golden Gate Bridge opened to traffic in May 1937; its main span is 1,280 metres."
    docs = [{"id": "memos", "text": "\n\n".join(filler[:15])},
            {"id": "bridges", "text": "\n\n".join(filler[15:] + [answer])}]
    total = sum(tokens.count_text(d["text"]) for d in docs)
    raw = client(one, new_key(admin, "t-docs")).chat.completions.with_raw_response.create(
        model="small", max_tokens=4, messages=[{"role": "user", "content": "When did the Golden Gate Bridge open?"}],
        extra_body={"documents": docs})
    reply = raw.parse()
    kept = raw.headers["x-extproc-document-chunks"].split(",")
    last_bridge_chunk = max(int(k.split("#")[1]) for k in kept if k.startswith("bridges#"))
    assert last_bridge_chunk >= 1  # the chunk holding the answer (the document's last) was ranked in
    assert kept == sorted(kept, key=lambda k: (k.split("#")[0] != "memos", int(k.split("#")[1])))
    kept_n, all_n = raw.headers["x-extproc-documents"].split()[0].split("/")
    assert int(kept_n) < int(all_n)
    assert reply.usage.prompt_tokens < total and int(raw.headers["x-extproc-tokens-cut"]) > 0


# budgets ----------------------------------------------------------------------------------------
def test_spend_recorded_equals_sum_of_usage(gateways):
    one, two, admin = gateways
    key = new_key(admin, "t-spend")
    tokens_sum = usd_sum = 0
    for i in range(6):
        c = client(one if i % 2 else two, key)
        msgs = [{"role": "user", "content": f"Tell me about number {i}"}]
        if i < 3:
            reply = c.chat.completions.create(model="small", max_tokens=8, messages=msgs)
            usage = reply.usage
        else:
            usage = None
            for chunk in c.chat.completions.create(model="small", max_tokens=8, messages=msgs, stream=True,
                                                   stream_options={"include_usage": True}):
                usage = chunk.usage or usage
        tokens_sum += usage.total_tokens
        usd_sum += cost_nano("small", usage)
    rows = settled_spend(admin, "t-spend")
    assert rows[("tokens", "day")].spent == tokens_sum and rows[("tokens", "month")].spent == tokens_sum
    assert rows[("usd", "day")].spent == usd_sum
    assert rows[("requests", "day")].spent == 6 and rows[("tokens", "day")].reserved == 0
    # t-spend has no limit (only tracked windows): its requests were admitted from leased budget
    # blocks, and spend is still exactly the sum of usage.
    assert admissions_from_blocks(one) > 0


def admissions_from_blocks(gateway) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('extproc_budget_admissions_total{source="block"}'))


def triton_inferences(stack, model: str = "llm-small") -> int:
    return model_requests(stack.ports.triton_http, model)


def test_200_concurrent_requests_from_two_gateways_admit_50(gateways, stack):
    one, two, admin = gateways
    key = new_key(admin, "t-conc")  # requests_per_day: 50
    before = triton_inferences(stack)

    def call(i: int):
        s = one if i % 2 else two
        r = httpx.post(f"{s.base_url}/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "small", "max_tokens": 1, "messages": [{"role": "user", "content": f"n{i}"}]},
                       timeout=60)
        return r.status_code, r.headers.get("retry-after"), r.json()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(200)))
    statuses = [s for s, _, _ in results]
    admitted = statuses.count(200)
    assert admitted <= 50 and statuses.count(429) == 200 - admitted
    assert admitted == 50  # nothing else failed them
    refused = next(r for r in results if r[0] == 429)
    assert int(refused[1]) > 0 and refused[2]["error"]["code"] == "budget_exceeded"
    assert "tenant 't-conc': requests per day" in refused[2]["error"]["message"]
    assert triton_inferences(stack) - before == admitted  # refused ones never reached Triton
    rows = settled_spend(admin, "t-conc")
    assert rows[("requests", "day")].spent == 50 and rows[("requests", "day")].remaining == 0


@pytest.mark.parametrize("tenant, metric, limit", [("t-conc-tokens", "tokens", 3000),
                                                   ("t-conc-usd", "usd", 200_000)])  # nano-USD: $0.0002
def test_200_concurrent_requests_from_two_gateways_never_overspend(gateways, tenant, metric, limit):
    # The worst case of each request is reserved before it goes upstream (its prompt as Triton
    # counts it, chat template included, + max_tokens): whatever the race, spend <= limit.
    one, two, admin = gateways
    key = new_key(admin, tenant)

    def call(i: int):
        s = one if i % 2 else two
        r = httpx.post(f"{s.base_url}/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "small", "max_tokens": 16,
                             "messages": [{"role": "user", "content": f"Hello, how are you today? {i}"}]},
                       timeout=60)
        return r.status_code, r.json()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(200)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    answered = [body for status, body in results if status == 200]
    rows = settled_spend(admin, tenant)
    used = sum(b["usage"]["total_tokens"] for b in answered) if metric == "tokens" else \
        sum(cost_nano("small", openai.types.CompletionUsage(**b["usage"])) for b in answered)
    row = rows[(metric, "day")]
    assert 0 < len(answered) < 200 and row.reserved == 0
    assert row.spent == used  # spend is exactly the usage of the answered requests
    assert row.spent <= limit, (row.spent, limit, len(answered))


def test_remaining_budget_exact_after_aborted_streams(gateways):
    one, _, admin = gateways
    key = new_key(admin, "t-abort")
    c = client(one, key)
    completed = 0
    for i in range(2):
        completed += c.chat.completions.create(model="small", max_tokens=4,
                                               messages=[{"role": "user", "content": f"ok {i}"}]).usage.total_tokens
    prompts = 0
    for i in range(5):
        # Long enough (~1 s on the large CPU tier) that the hang-up always lands mid-stream.
        messages = [{"role": "user", "content": f"write a long story {i}"}]
        stream = c.chat.completions.create(model="large", max_tokens=300, stream=True, messages=messages)
        next(iter(stream))
        stream.close()  # the client hangs up mid-stream
        prompts += tokens.count_text(render("chatml", [ChatMessage(role="user", content=messages[0]["content"])]))
    rows = settled_spend(admin, "t-abort")
    row = rows[("tokens", "day")]
    # Each abandoned stream is charged its prompt and what it had been sent (on_abort:
    # charge_delivered, the default): at least one token each, at most the 64 context_caps allows.
    assert row.reserved == 0
    assert completed + prompts + 5 <= row.spent <= completed + prompts + 5 * 64
    assert row.remaining == 100_000 - row.spent
    assert rows[("requests", "day")].spent == 7  # hanging up does not dodge the request count


def stream_to_done_then_reset(gateway, key: str, content: str) -> int:
    """Stream a chat completion over a raw socket, read until ``[DONE]``, then reset the connection
    at once (SO_LINGER 0), before the upstream's end of stream can reach the gateway; returns the
    total_tokens the stream reported."""
    import socket
    import struct
    from urllib.parse import urlsplit

    url = urlsplit(gateway.base_url)
    body = json.dumps({"model": "small", "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": content}]}).encode()
    head = (f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    try:
        sock.sendall(head + body)
        data = b""
        while b"data: [DONE]" not in data:
            chunk = sock.recv(65536)
            assert chunk, data[-500:]
            data += chunk
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    usage = [json.loads(line[6:])["usage"] for line in data.decode().splitlines()
             if line.startswith("data: {") and '"usage":{' in line]
    return usage[-1]["total_tokens"]


def test_stream_read_to_done_then_reset_is_charged_in_full(gateways):
    # A client may hang up the moment it reads [DONE] (the OpenAI SDK closes its stream then): the
    # answer was complete, so it is charged its usage, never released as an aborted stream.
    one, _, admin = gateways
    key = new_key(admin, "t-done-reset")
    used = sum(stream_to_done_then_reset(one, key, f"count to {i}") for i in range(6))
    rows = settled_spend(admin, "t-done-reset")
    assert rows[("tokens", "day")].spent == used and rows[("tokens", "day")].reserved == 0
    assert rows[("requests", "day")].spent == 6


# durability -------------------------------------------------------------------------------------
def test_redis_restart_loses_no_acknowledged_spend(env, stack, make_stack, tmp_path_factory):
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    work = tmp_path_factory.mktemp("aof")
    redis = RedisServer(work, durable=True)  # appendfsync always: acknowledged means on disk
    redis.start()
    try:
        gw = make_stack(write_config(work / "dur.yaml", admin_port=None, redis_url=redis.url), workers=1,
                        redis=False, share_triton_with=stack)
        import asyncio

        from extproc_plugins.tenancy.api_keys import KeyRing
        from extproc_plugins.budgets.ledger import BudgetLedger, Subject
        from extproc.state.redis_store import RedisStore

        async def make_key():
            store = RedisStore(redis.url, prefix="e2e-budgets:")
            try:
                return (await KeyRing(store, PEPPER.encode()).create("t-dur"))[1]
            finally:
                await store.close()

        async def recorded():
            store = RedisStore(redis.url, prefix="e2e-budgets:")
            try:
                rows = (await BudgetLedger(store).report(Subject("tenant", "t-dur")))["windows"]
                return {(r["metric"], r["window"]): r for r in rows}
            finally:
                await store.close()

        key = asyncio.run(make_key())
        c = client(gw, key)
        acknowledged = 0

        def one_request(i: int) -> int:
            reply = c.chat.completions.create(model="small", max_tokens=4,
                                              messages=[{"role": "user", "content": f"durable {i}"}])
            return reply.usage.total_tokens

        for i in range(5):
            acknowledged += one_request(i)
        redis.kill()
        served = 10
        with pytest.raises(openai.APIStatusError) as err:  # no store: refused, never unmetered...
            for i in range(6):
                # ...once the budget block this worker leased before the outage (reserved in the
                # store, so still metered) is used up or retired (leases.seconds: 1 s)
                acknowledged += one_request(100 + i)
                served += 1
                time.sleep(0.5)
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "1"
        assert served <= 10 + 3  # 1 s of a block at one request per 0.5 s and more
        redis.start()  # same port, same dir: replays the append-only file
        done, deadline = 0, time.monotonic() + 20
        while done < 5 and time.monotonic() < deadline:
            try:
                acknowledged += one_request(200 + done)
                done += 1
            except openai.APIStatusError as exc:  # the first calls may find the old connection gone
                assert exc.status_code == 503
                time.sleep(0.2)
        assert done == 5
        # Reconciles land in the background after each answer (one may have waited in the retry
        # queue while Redis was down): read once nothing is reserved any more.
        deadline = time.monotonic() + 15
        rows = asyncio.run(recorded())
        while rows[("tokens", "month")]["reserved"] and time.monotonic() < deadline:
            time.sleep(0.1)
            rows = asyncio.run(recorded())
        assert rows[("tokens", "month")]["spent"] == acknowledged
        assert rows[("tokens", "month")]["reserved"] == 0
        assert rows[("requests", "month")]["spent"] == served
    finally:
        if redis.proc and redis.proc.poll() is None:
            redis.proc.terminate()
            redis.proc.wait(5)
