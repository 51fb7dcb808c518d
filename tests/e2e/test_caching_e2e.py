"""Caching and duplicate suppression through real Envoy, Triton and Redis, with the openai client.

Gateway one (2 workers) runs ``cache-e2e.yaml`` in front of the session stack's Triton, with a
Redis of this module's own; gateway two (1 worker) shares that Triton and that Redis. Whether a
request reached Triton is read from Triton's own statistics (``inference_count``). A third gateway
with yet another Redis of its own proves that stopping Redis degrades to no cache, never to errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from extproc_plugins.tenancy.api_keys import hash_key

from ..conftest import ROOT, free_port, require
from .conftest import model_requests
from ..redis_server import RedisServer

pytestmark = pytest.mark.e2e

CONFIG = ROOT / "tests" / "e2e" / "cache-e2e.yaml"
PEPPER = "e2e-pepper-for-caching-0123456789"
KEYS = {"A": "sk-e2e-cache-tenant-a-0001", "B": "sk-e2e-cache-tenant-b-0002", "C": "sk-e2e-cache-tenant-c-0003"}


def own_redis(workdir: Path) -> RedisServer:
    """A redis-server of this module's own, which a test may stop and start again."""
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    return RedisServer(workdir).start()


def write_config(path: Path, redis_url: str) -> Path:
    cfg = yaml.safe_load(CONFIG.read_text())
    tenancy = next(p for p in cfg["plugins"] if p["name"] == "tenancy")
    tenancy["settings"]["keys"] = [{"id": f"key-{t}", "hash": hash_key(PEPPER.encode(), k), "tenant": f"tenant-{t}"}
                                   for t, k in KEYS.items()]
    cfg["state"]["redis_url"] = redis_url
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def env():
    saved = os.environ.get("EXTPROC_E2E_CACHE_PEPPER")
    os.environ["EXTPROC_E2E_CACHE_PEPPER"] = PEPPER
    yield
    if saved is None:
        os.environ.pop("EXTPROC_E2E_CACHE_PEPPER", None)
    else:
        os.environ["EXTPROC_E2E_CACHE_PEPPER"] = saved


@pytest.fixture(scope="module")
def cache_redis(tmp_path_factory):
    server = own_redis(tmp_path_factory.mktemp("cache-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(env, stack, make_stack, cache_redis, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("cache") / "one.yaml", cache_redis.url)
    return make_stack(config, workers=2, redis=False, share_triton_with=stack, metrics_port=free_port())


def client(gateway, tenant: str = "A") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=KEYS[tenant], max_retries=0, timeout=60)


def inferences(gateway, model: str = "llm-small") -> int:
    """The requests Triton's ``model`` served (health checks left out), once settled."""
    return model_requests(gateway.ports.triton_http, model)


def ask(c: openai.OpenAI, content: str, *, system: str | None = None, model: str = "small", headers=None, **kw):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    kw.setdefault("temperature", 0)
    raw = c.chat.completions.with_raw_response.create(model=model, messages=messages, extra_headers=headers, **kw)
    return raw.headers, raw.parse()


def nonce() -> str:
    return uuid.uuid4().hex[:8]


def test_a_repeat_is_served_without_reaching_triton(gw):
    c, prompt = client(gw), f"Tell me a story about the lighthouse keeper {nonce()}"
    before = inferences(gw)
    h1, first = ask(c, prompt)
    assert inferences(gw) == before + 1 and h1["x-extproc-cache"] == "miss"
    h2, again = ask(c, prompt)
    assert inferences(gw) == before + 1  # Triton's count did not move
    assert h2["x-extproc-cache"] == "hit"
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.completion_tokens == first.usage.completion_tokens


def test_a_streamed_hit_is_proper_sse_for_the_openai_client(gw):
    c, prompt = client(gw), f"Describe the sea at night {nonce()}"
    _, first = ask(c, prompt)
    before = inferences(gw)
    raw = c.chat.completions.with_raw_response.create(
        model="small", temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": prompt}])
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-extproc-cache"] == "hit"
    chunks = list(raw.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == first.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens
    assert any(ch.choices and ch.choices[0].finish_reason for ch in chunks)
    assert inferences(gw) == before


def test_a_paraphrase_hits_the_semantic_cache_near_misses_do_not(gw):
    c, system = client(gw), f"You answer geography questions. Session {nonce()}."
    _, first = ask(c, "What is the capital of France?", system=system)
    before = inferences(gw)
    h, para = ask(c, "Which city is the capital of France?", system=system)
    assert h["x-extproc-cache"] == "semantic_hit" and float(h["x-extproc-cache-similarity"]) >= 0.9
    assert para.choices[0].message.content == first.choices[0].message.content
    assert inferences(gw) == before
    ask(c, "How many moons does Mars have?", system=system)
    ask(c, "What is the square root of 144?", system=system)
    ask(c, "Is a tomato a fruit?", system=system)
    before = inferences(gw)
    for near_miss in ("What is the capital of Germany?",  # another city
                      "What is the square root of 169?",  # another number
                      "Is a tomato not a fruit?"):  # a negation
        h, _ = ask(c, near_miss, system=system)
        assert h["x-extproc-cache"] == "miss", near_miss
    assert inferences(gw) == before + 3


def test_tenant_a_never_receives_tenant_b_answer(gw):
    prompt = f"What is our internal launch code name {nonce()}?"
    _, a = ask(client(gw, "A"), prompt)
    before = inferences(gw)
    hb, _ = ask(client(gw, "B"), prompt)  # not the same request...
    hc, _ = ask(client(gw, "C"), "Tell me: " + prompt)  # ...nor by meaning
    assert hb["x-extproc-cache"] == "miss" and hc["x-extproc-cache"] == "miss"
    assert inferences(gw) == before + 2
    ha, a2 = ask(client(gw, "A"), prompt)
    assert ha["x-extproc-cache"] == "hit" and a2.choices[0].message.content == a.choices[0].message.content


def test_n_concurrent_identical_requests_cause_one_inference(gw):
    prompt, n = f"Write a long ballad about the river {nonce()}", 8

    async def one(c, stream: bool):
        raw = await c.chat.completions.with_raw_response.create(
            model="large", temperature=0, max_tokens=64, messages=[{"role": "user", "content": prompt}], stream=stream)
        parsed = raw.parse()
        if not stream:
            return raw.headers["x-extproc-cache"], parsed.choices[0].message.content
        return raw.headers["x-extproc-cache"], "".join(
            [ch.choices[0].delta.content or "" async for ch in parsed if ch.choices])

    async def run():
        c = openai.AsyncOpenAI(base_url=gw.base_url, api_key=KEYS["A"], max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*[one(c, stream=(i % 2 == 1)) for i in range(n)])
        finally:
            await c.close()

    before = inferences(gw, "llm-large")
    results = asyncio.run(run())
    assert inferences(gw, "llm-large") == before + 1
    statuses = sorted(status for status, _ in results)
    assert statuses.count("miss") == 1 and set(statuses) <= {"miss", "coalesced", "hit"}, statuses
    texts = {text for _, text in results}
    assert len(texts) == 1


def test_a_follower_may_wait_longer_than_envoys_message_timeout(gw):
    """The leader's answer completes 3 s late (test_slow_complete), past Envoy's 2 s per-message
    timeout; the follower, parked in the request phase, still gets it: the service asked Envoy for
    more time, for the leader's last response chunk too."""
    prompt = f"Tell me about tides slow-complete-3s {nonce()}"
    results = {}

    def leader():
        results["leader"] = ask(client(gw), prompt)

    thread = threading.Thread(target=leader)
    thread.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    h, follower = ask(client(gw), prompt)
    waited = time.perf_counter() - t0
    thread.join()
    assert results["leader"][0]["x-extproc-cache"] == "miss"
    assert h["x-extproc-cache"] == "coalesced" and waited > 2.2
    assert follower.choices[0].message.content == results["leader"][1].choices[0].message.content


def test_idempotency_key_replays_whatever_the_temperature_and_422s_another_body(gw):
    c, key = client(gw), {"Idempotency-Key": f"order-{nonce()}"}
    before = inferences(gw)
    h1, first = ask(c, "Invent a product name", temperature=1.5, headers=key)
    h2, retry = ask(c, "Invent a product name", temperature=1.5, headers=key)
    assert inferences(gw) == before + 1 and h2["x-extproc-cache"] == "idempotent"
    assert retry.id == first.id and retry.choices[0].message.content == first.choices[0].message.content
    with pytest.raises(openai.UnprocessableEntityError) as err:
        ask(c, "Invent a company name", temperature=1.5, headers=key)
    assert err.value.status_code == 422 and err.value.body["code"] == "idempotency_key_reused"


def test_cache_controls_and_bad_control_headers(gw):
    c, prompt = client(gw), f"Name a colour {nonce()}"
    ask(c, prompt)
    before = inferences(gw)
    h, _ = ask(c, prompt, headers={"Cache-Control": "no-cache"})
    assert h["x-extproc-cache"] == "bypass" and inferences(gw) == before + 1
    with httpx.Client(base_url=f"http://127.0.0.1:{gw.ports.listen}", timeout=30) as http:
        r = http.post("/v1/chat/completions", headers={"X-Cache-TTL": "forever"},
                      json={"model": "small", "temperature": 0, "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "invalid_cache_ttl"


def scrape(gateway) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            samples[key] = samples.get(key, 0.0) + s.value
    return samples


def total(samples, name, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_lookups_and_savings_reach_the_metrics(gw):
    c, prompt = client(gw), f"Name three rivers {nonce()}"
    before = scrape(gw)
    _, first = ask(c, prompt)
    ask(c, prompt)
    saved = first.usage.total_tokens
    deadline = time.monotonic() + 20
    while True:  # request_finished runs as the stream closes; workers' metrics are merged on scrape
        after = scrape(gw)
        hits = (total(after, "extproc_cache_lookups_total", layer="exact", result="hit")
                - total(before, "extproc_cache_lookups_total", layer="exact", result="hit"))
        if hits >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert hits == 1
    assert (total(after, "extproc_cache_lookups_total", layer="exact", result="miss")
            - total(before, "extproc_cache_lookups_total", layer="exact", result="miss")) >= 1
    assert (total(after, "extproc_tokens_total", kind="saved")
            - total(before, "extproc_tokens_total", kind="saved")) == saved
    assert total(after, "extproc_cost_saved_usd_total") > total(before, "extproc_cost_saved_usd_total")
    for layer, result in (("semantic", "miss"), ("coalescing", "leader")):  # the first request's other lookups
        assert (total(after, "extproc_cache_lookups_total", layer=layer, result=result)
                - total(before, "extproc_cache_lookups_total", layer=layer, result=result)) >= 1, layer


def test_a_repeated_auto_request_is_an_exact_hit_routed_from_memory(gw):
    """``model: auto``: the first request is routed (embedded) and answered by Triton; its repeats
    are exact hits whose tier comes from the routers' memo (extproc_plugins/routing/route_memo.py),
    not from a new embedding: at most one routing per worker (the memo is per worker)."""
    c, prompt = client(gw), f"Summarize the plot of Hamlet in two sentences {nonce()}"
    before, triton_before = scrape(gw), sum(inferences(gw, m) for m in ("llm-small", "llm-medium", "llm-large"))
    h_first, first = ask(c, prompt, model="auto")
    repeats = [ask(c, prompt, model="auto") for _ in range(8)]
    assert h_first["x-extproc-cache"] == "miss"
    assert {h["x-extproc-cache"] for h, _ in repeats} == {"hit"}
    assert {h["x-extproc-tier"] for h, _ in repeats} == {h_first["x-extproc-tier"]}
    assert {r.choices[0].message.content for _, r in repeats} == {first.choices[0].message.content}
    assert sum(inferences(gw, m) for m in ("llm-small", "llm-medium", "llm-large")) == triton_before + 1

    def steps(samples, plugin):
        return total(samples, "extproc_route_steps_total", plugin=plugin) - total(before, "extproc_route_steps_total", plugin=plugin)

    deadline = time.monotonic() + 20
    while True:  # request_finished runs as the stream closes; workers' metrics are merged on scrape
        after = scrape(gw)
        if steps(after, "route_memo") >= len(repeats) - 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert 1 <= steps(after, "semantic_routes") <= 2  # the first request, and at most once on the other worker
    assert steps(after, "route_memo") >= len(repeats) - 1  # every other repeat: no embedding, no routing


def test_two_gateway_processes_share_hits_through_redis(gw, stack, make_stack, cache_redis, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("cache") / "two.yaml", cache_redis.url)
    two = make_stack(config, workers=1, redis=False, share_triton_with=stack)
    system = f"You are terse. Session {nonce()}."
    _, first = ask(client(gw), "Who wrote Pride and Prejudice?", system=system)
    before = inferences(gw)
    h_exact, exact = ask(client(two), "Who wrote Pride and Prejudice?", system=system)
    h_sem, sem = ask(client(two), "Who is the author of Pride and Prejudice?", system=system)
    assert (h_exact["x-extproc-cache"], h_sem["x-extproc-cache"]) == ("hit", "semantic_hit")
    assert exact.choices[0].message.content == sem.choices[0].message.content == first.choices[0].message.content
    assert inferences(gw) == before


def test_redis_going_away_degrades_to_no_cache_without_failing_requests(stack, make_stack, env, tmp_path_factory):
    work = tmp_path_factory.mktemp("cache-down")
    redis = own_redis(work)
    try:
        three = make_stack(write_config(work / "three.yaml", redis.url), workers=1, redis=False,
                           share_triton_with=stack)
        c, prompt = client(three), f"Count the stars {nonce()}"
        ask(c, prompt)
        assert ask(c, prompt)[0]["x-extproc-cache"] == "hit"
        redis.stop()
        before, prompt = inferences(three), f"Count the planets {nonce()}"
        for _ in range(3):
            h, reply = ask(c, prompt)
            assert h["x-extproc-cache"] == "miss" and reply.choices[0].message.content
        assert inferences(three) == before + 3  # no cache, but every request answered
        redis.start()  # an empty Redis comes back: caching resumes after the breaker's cool-down
        time.sleep(1.2)
        ask(c, prompt)
        ask(c, prompt)
        assert ask(c, prompt)[0]["x-extproc-cache"] == "hit"
    finally:
        redis.stop()
