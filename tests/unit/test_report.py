"""`extproc report`: the numbers, the period, the tables, the JSON, the charts, bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from extproc.observability.report import parse_time, render_table, summarize, time_series, write_charts
from extproc.observability.usage import JsonlFile, encode

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def rec(ts, tenant="acme", workflow="support", tier="small", prompt=100, completion=50, cost=0.01,
        cache=None, saved=0, retry=False, outcome="completed"):
    return {"v": 1, "ts": ts, "request_id": f"r{ts}", "tenant": tenant, "workflow": workflow, "tier": tier,
            "prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": cost,
            "cost": {"prompt": cost * 0.4, "completion": cost * 0.6, "retries": 0.0, "embeddings": 0.0,
                     "overhead": 0.0},
            "cache_status": cache, "tokens_saved": saved, "cost_saved_usd": 0.0, "retry": retry,
            "outcome": outcome}


RECORDS = [rec(T0), rec(T0 + 60, tier="large", cost=0.05), rec(T0 + 120, cache="hit", prompt=0, completion=0,
                                                               cost=0.0, saved=50),
           rec(T0 + 180, tenant="globex", workflow=None, retry=True)]


def test_summary_numbers():
    s = summarize(RECORDS)
    t = s["total"]
    assert t["requests"] == 4 and t["cost_usd"] == pytest.approx(0.07)
    assert t["cost_per_request_usd"] == pytest.approx(0.0175)
    assert t["cost_per_1k_tokens_usd"] == pytest.approx(0.07 / 450 * 1000)
    assert t["cache_hit_rate"] == 0.25 and t["tokens_saved"] == 50 and t["retries"] == 1
    tiers = {r["tier"]: r for r in s["by_tier"]}
    assert tiers["small"]["share"] == 0.75 and tiers["large"]["share"] == 0.25
    assert [r["tier"] for r in s["by_tier"]] == ["large", "small"]  # largest cost first
    assert {r["workflow"] for r in s["by_workflow"]} == {"support", "none"}
    acme = next(r for r in s["by_tenant"] if r["tenant"] == "acme")
    assert acme["cost_usd"] == pytest.approx(0.06) and acme["cost_split_usd"]["completion"] == pytest.approx(0.036)


def test_period_forms():
    now = T0 + 3600
    assert parse_time("30m", now) == now - 1800 and parse_time("2d", now) == now - 172800
    assert parse_time("2026-01-01") == T0 and parse_time("2026-01-01T01:00:00+01:00") == T0
    assert parse_time(str(T0)) == T0 and parse_time(None) is None
    with pytest.raises(ValueError, match="cannot read the time 'soon'"):
        parse_time("soon")


def test_table_and_time_series():
    text = render_table(summarize(RECORDS))
    assert "usage report: 4 request(s), 2026-01-01 00:00:00 UTC .. 2026-01-01 00:03:00 UTC" in text
    for heading in ("by workflow:", "by tenant:", "by tier:"):
        assert heading in text
    series = time_series(RECORDS)
    assert series["bucket_seconds"] == 10 and sum(series["requests"]) == 4
    assert sum(series["cost_usd"]) == pytest.approx(0.07) and max(series["cache_hit_rate"]) == 1.0
    assert time_series([])["starts"] == []


def test_charts_are_pngs(tmp_path):
    paths = write_charts(RECORDS, tmp_path)
    assert [p.name for p in paths] == ["cost_over_time.png", "tier_mix.png", "cache_hit_rate.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert len(write_charts([], tmp_path / "empty")) == 3  # an empty period still draws (empty) charts


def run(*args):
    return subprocess.run([sys.executable, "-m", "extproc", "report", *args], capture_output=True, text=True,
                          timeout=120)


def test_command_reads_rotated_files_filters_the_period_and_prints_json(tmp_path):
    path = tmp_path / "usage.jsonl"
    sink = JsonlFile(path, max_bytes=600, backups=10)
    for r in RECORDS:
        sink.write([encode(r)])
    assert len(list(tmp_path.glob("usage.jsonl*"))) > 2  # rotated
    out = run("--file", str(path), "--format", "json", "--since", str(T0 + 30), "--until", str(T0 + 150))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["total"]["requests"] == 2  # T0+60 and T0+120
    assert run("--file", str(tmp_path), "--format", "json").returncode == 0  # a directory works too


def test_command_bad_arguments_are_named():
    out = run("--file", "/nonexistent/usage.jsonl", "--since", "whenever")
    assert out.returncode == 2 and "cannot read the time 'whenever'" in out.stderr
    empty = run("--file", "/nonexistent/usage.jsonl")
    assert empty.returncode == 0 and "usage report: 0 request(s)" in empty.stdout
