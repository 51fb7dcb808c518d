"""Memory under sustained load, in process: thousands of distinct requests through the default plugin chain.

The embedded default configuration (every default plugin, in order, memory state) with small store
bounds so that they fill during the warm-up; the harness plays Envoy and Triton. After the warm-up,
tracemalloc counts what is still allocated; the last 1,500 requests must not add more than a
small fixed budget (a leak of a few dozen bytes per request would), and every store must sit at or
under its bound. The soak benchmark through real Envoy is benchmarks/bench_soak_memory.py.

Deterministic: the mix is a fixed cycle, the encoder a hash (no MiniLM), load_spill reads no
metrics, usage records are flushed at each checkpoint; timing does not change what is allocated.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import tracemalloc

import numpy as np
import pytest
import yaml

from extproc.embeddings import prompt as prompts
from extproc.framework.config import default_config_text, parse_config
from extproc.observability.memdiag import holdings
from extproc.framework.testing import GatewayHarness

WARMUP = 1200  # fills every store to its bound (a third of the requests are stored answers)
SETTLE = 1200  # traced from here: replaces every entry allocated before tracemalloc started
MEASURED = 1500
BUDGET_BYTES = 64 * 1024  # growth allowed over the measured part: 44 B per request (measured: ~6 KiB)
EXACT_BOUND, IDEM_BOUND, EMBEDDINGS = 128 * 1024, 32 * 1024, 64
ROUTE_MEMO = 64  # decisions each embedding router remembers (extproc_plugins/routing/route_memo.py)


class HashEncoder:
    """Stands in for MiniLM: a unit vector derived from the text's hash (fast, deterministic)."""

    def encode(self, texts):
        out = np.empty((len(texts), 384), np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            v = np.random.default_rng(seed).standard_normal(384)
            out[i] = v / np.linalg.norm(v)
        return out


def soak_config(tmp_path):
    cfg = yaml.safe_load(default_config_text())
    settings = {
        "exact_cache": {"memory_max_bytes": EXACT_BOUND},
        "idempotency": {"memory_max_bytes": IDEM_BOUND},
        "usage_records": {"path": str(tmp_path / "usage.jsonl"), "flush_seconds": 60},
        "load_spill": {"max_depth": {}},  # no queue to read in process: nothing goes to the network
        "semantic_routes": {"memo_entries": ROUTE_MEMO},
        "learned_router": {"memo_entries": ROUTE_MEMO},
    }
    for entry in cfg["plugins"]:
        entry["settings"] = {**(entry.get("settings") or {}), **settings.get(entry["name"], {})}
    assert {e["name"] for e in cfg["plugins"]} >= set(settings)
    return parse_config(cfg)


class Mix:
    """A fixed cycle of request kinds, every prompt distinct."""

    KINDS = ("distinct", "stream", "repeat", "sampled", "idem_new", "idem_replay", "bad_json", "unknown_model",
             "hangup", "auto", "completions", "upstream_error")

    def __init__(self, gw: GatewayHarness):
        self.gw = gw
        self.recent: list[str] = []
        self.idem: list[tuple[str, str]] = []
        self.statuses: dict[str, set[int]] = {}

    async def send(self, i: int) -> None:
        kind = self.KINDS[i % len(self.KINDS)]
        prompt = f"request {i}: " + " ".join(f"w{(i * 7919 + j) % 1000}" for j in range(i % 40 + 5))
        gw = self.gw
        if kind == "distinct":
            self.recent = [*self.recent[-63:], prompt]
            r = await gw.chat(prompt, model="small", temperature=0)
        elif kind == "stream":
            r = await gw.chat(prompt, model="medium", temperature=0, stream=True, answer="a streamed answer here")
        elif kind == "repeat":
            r = await gw.chat(self.recent[i % len(self.recent)], model="small", temperature=0)
        elif kind == "sampled":
            r = await gw.chat(prompt, model="small", temperature=0.8)
        elif kind == "idem_new":
            key = f"key-{i}"
            r = await gw.chat(prompt, model="small", headers={"idempotency-key": key})
            self.idem = [*self.idem[-31:], (key, prompt)]
        elif kind == "idem_replay":
            key, old = self.idem[i % len(self.idem)]
            r = await gw.chat(old, model="small", headers={"idempotency-key": key})
        elif kind == "bad_json":
            r = await gw.send(b'{"model": "small", "messages": [' + str(i).encode())
            assert r.status == 400 and r.json()["error"]["message"]
        elif kind == "unknown_model":
            r = await gw.chat(prompt, model=f"model-{i}")
            assert r.status == 404 and r.json()["error"]["code"] == "model_not_found"
        elif kind == "hangup":
            r = await gw.chat(prompt, model="small", temperature=0, stream=True, answer="one two three four",
                              abort_after_chunks=1)
            assert r.ctx.outcome == "aborted"
        elif kind == "auto":
            r = await gw.chat(prompt, model="auto", temperature=0)
        elif kind == "completions":
            r = await gw.send({"model": "small", "prompt": prompt, "temperature": 0}, path="/v1/completions")
        else:
            r = await gw.chat(prompt, model="large", temperature=0, upstream_status=500,
                              upstream_chunks=[json.dumps({"error": f"backend failed {i}"}).encode()])
            assert r.status == 500 and r.json()["error"]["message"]
        self.statuses.setdefault(kind, set()).add(r.status)
        await asyncio.sleep(0)  # let background work (usage records) run, as a server would


@pytest.fixture
def hash_embedder(monkeypatch):
    embedder = prompts.PromptEmbedder(HashEncoder, cache_entries=EMBEDDINGS)
    monkeypatch.setattr(prompts, "_shared", embedder)
    return embedder


async def test_memory_stays_bounded_over_thousands_of_distinct_requests(tmp_path, hash_embedder):
    async with GatewayHarness(config=soak_config(tmp_path)) as gw:
        plugins = {p.name: p.obj for p in gw.gateway.hooks.plugins}
        usage = plugins["usage_records"]
        mix = Mix(gw)

        async def checkpoint() -> tuple[int, dict, int]:
            await usage.flush()
            gc.collect()
            return tracemalloc.get_traced_memory()[0], holdings(gw.gateway), len(asyncio.all_tasks())

        for i in range(WARMUP):
            await mix.send(i)
        await usage.flush()
        gc.collect()
        tracemalloc.start(1)
        try:
            for i in range(WARMUP, WARMUP + SETTLE):
                await mix.send(i)
            mid, held_mid, tasks_mid = await checkpoint()
            for i in range(WARMUP + SETTLE, WARMUP + SETTLE + MEASURED):
                await mix.send(i)
            end, held_end, tasks_end = await checkpoint()
            top = tracemalloc.take_snapshot().statistics("lineno")[:8] if end - mid >= BUDGET_BYTES else []
        finally:
            tracemalloc.stop()

    growth = end - mid
    assert growth < BUDGET_BYTES, (f"{growth} B more allocated after {MEASURED} more requests (mid {mid}, end {end}); "
                                   "largest live allocations:\n" + "\n".join(map(str, top)))
    # every store is at its bound, not past it: the bound is what stopped it
    for name, bound in (("exact_cache.store", EXACT_BOUND), ("idempotency.store", IDEM_BOUND)):
        store = held_end[name]
        assert store["max_bytes"] == bound and 0.8 * bound < store["bytes"] <= bound, (name, store)
    assert held_end["gateway.store"]["entries"] == 0  # no default plugin keeps state in the shared store
    assert len(hash_embedder.cache) == EMBEDDINGS
    assert len(plugins["semantic_routes"].memo) == len(plugins["learned_router"].memo) == ROUTE_MEMO
    assert held_end["coalescing.in_flight"] == 0 and held_end["usage_records.pending"] == 0
    assert usage.dropped == 0
    assert held_end["metric_children"] == held_mid["metric_children"]  # label sets stopped growing
    assert held_end["plugin_failures"] == 0
    assert tasks_end == tasks_mid  # no per-request task left behind
    assert mix.statuses["distinct"] == {200} and mix.statuses["repeat"] == {200}
    assert mix.statuses["idem_replay"] == {200}
