"""The usage_records plugin and its sinks: file (rotating, multi-process safe), Redis stream, fallback."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time

import pytest
import yaml

from extproc.framework.config import default_config_text, parse_config
from extproc.observability.metrics import get_metrics
from extproc.state.memory import MemoryStore
from extproc.state.redis_store import RedisStore
from extproc.framework.testing import GatewayHarness
from extproc.observability.usage import JsonlFile, jsonl_files, read_jsonl, read_redis

from ..conftest import free_port


def cfg(settings, redis_url=None):
    data = yaml.safe_load(default_config_text())
    data["plugins"] = [{"name": "model_tiers"},
                       {"name": "usage_records", "on_error": "fail_open", "settings": settings}]
    data["costs"] = {"gateway_cpu_hour_usd": 1.0}
    if redis_url:
        data["state"] = {"redis_url": redis_url, "key_prefix": "test:"}
    return parse_config(data)


def counter(sink, result):
    return get_metrics().registry.get_sample_value(
        "extproc_usage_records_total", {"sink": sink, "result": result}) or 0.0


def plugin(gw):
    return next(p.obj for p in gw.gateway.hooks.plugins if p.name == "usage_records")


async def test_one_record_per_request_in_the_file(tmp_path):
    path = tmp_path / "usage.jsonl"
    async with GatewayHarness(config=cfg({"path": str(path)})) as gw:
        ok = await gw.chat("hello", model="medium", answer="one two three",
                           headers={"x-stainless-retry-count": "1"})
        bad = await gw.send(b"{not json")
        streamed = await gw.chat("hello", model="small", stream=True, answer="a b", abort_after_chunks=1)
    assert (ok.status, bad.status) == (200, 400)
    records = list(read_jsonl(path))
    assert [r["outcome"] for r in records] == ["completed", "replied", "aborted"]
    first = records[0]
    assert first["tier"] == "medium" and first["model"] == "llm-medium" and first["status"] == 200
    assert (first["prompt_tokens"], first["completion_tokens"]) == (5, 3)
    upstream = (5 * 0.0005 + 3 * 0.0015) / 1000
    assert first["retry"] is True and first["cost"]["retries"] == pytest.approx(upstream)
    assert first["cost"]["prompt"] == first["cost"]["completion"] == 0
    assert first["cost"]["overhead"] > 0  # gateway_cpu_hour_usd is set
    assert first["cost_usd"] == pytest.approx(sum(first["cost"].values()))
    assert first["latency_ms"]["upstream"] is not None and first["latency_ms"]["gateway"] > 0
    assert "phase:request_body" in first["timings_ms"] and "plugin:model_tiers" in first["timings_ms"]
    assert records[1]["status"] == 400 and records[1]["tier"] is None and records[1]["cost"]["prompt"] == 0
    assert records[2]["stream"] is True


def test_file_rotation_bounds_disk_use(tmp_path):
    sink = JsonlFile(tmp_path / "u.jsonl", max_bytes=2000, backups=2)
    for i in range(200):
        sink.write([json.dumps({"ts": i, "pad": "x" * 50}).encode()])
    files = jsonl_files(tmp_path / "u.jsonl")
    assert [f.name for f in files] == ["u.jsonl.2", "u.jsonl.1", "u.jsonl"]
    assert all(f.stat().st_size <= 2000 for f in files)
    kept = [r["ts"] for r in read_jsonl(tmp_path / "u.jsonl")]
    assert kept == list(range(200 - len(kept), 200))  # the newest, in order, none damaged


def _append(path, worker, n):
    sink = JsonlFile(path, max_bytes=50_000, backups=1000)
    for i in range(n):
        sink.write([json.dumps({"ts": i, "w": worker, "pad": "y" * 200}).encode() for _ in range(3)])


def test_several_processes_share_one_file_without_damage(tmp_path):
    path = tmp_path / "shared.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(str(path), w, 100)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = [line for f in jsonl_files(path) for line in f.read_bytes().splitlines()]
    assert len(lines) == 3 * 100 * 3
    assert all(json.loads(line)["pad"] == "y" * 200 for line in lines)  # no interleaved or torn line


async def test_redis_stream_sink(redis_url):
    store = RedisStore(redis_url, prefix="test:")
    stream = f"usage-{free_port()}"
    before = counter("redis", "written")
    async with GatewayHarness(config=cfg({"stream": stream}, redis_url=redis_url)) as gw:
        for i in range(5):
            await gw.chat(f"hi {i}", model="small")
    assert counter("redis", "written") - before == 5
    records = read_redis(redis_url, f"test:{stream}")
    assert len(records) == 5 and all(r["tier"] == "small" for r in records)
    assert len(await store.stream_range(stream)) == 5
    await store.close()


async def test_redis_down_falls_back_to_the_file(tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    path = tmp_path / "fallback.jsonl"
    before = counter("redis", "fallback")
    async with GatewayHarness(config=cfg({"path": str(path)}, redis_url=dead)) as gw:
        result = await gw.chat("hi", model="small")
        assert result.status == 200
    assert counter("redis", "fallback") - before == 1
    assert [r["tier"] for r in read_jsonl(path)] == ["small"]


async def test_memory_is_bounded_the_oldest_records_drop_and_are_counted(tmp_path):
    before = counter("file", "dropped")
    async with GatewayHarness(config=cfg({"path": str(tmp_path / "u.jsonl"), "max_pending": 5,
                                          "flush_seconds": 60})) as gw:
        for i in range(8):
            await gw.chat(f"hi {i}", model="small")
        records = plugin(gw)
        assert len(records.pending) == 5 and records.dropped == 3
    assert counter("file", "dropped") - before == 3
    assert len(list(read_jsonl(tmp_path / "u.jsonl"))) == 5  # flushed on shutdown


async def test_a_slow_disk_never_blocks_the_event_loop(tmp_path, monkeypatch):
    def slow_write(self, lines):
        time.sleep(0.5)

    monkeypatch.setattr(JsonlFile, "write", slow_write)
    async with GatewayHarness(config=cfg({"path": str(tmp_path / "u.jsonl"), "flush_seconds": 60})) as gw:
        await gw.chat("hi", model="small")
        flushing = asyncio.ensure_future(plugin(gw).flush())
        worst, last = 0.0, time.perf_counter()
        while not flushing.done():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now
        assert await flushing == 1
    assert worst < 0.2  # the loop kept turning while the write took 0.5 s


async def test_memory_store_streams_are_capped():
    store = MemoryStore()
    await store.stream_add("s", [b"%d" % i for i in range(10)], maxlen=4)
    assert await store.stream_range("s") == [b"6", b"7", b"8", b"9"]
    assert await store.stream_range("s", count=2) == [b"6", b"7"]
