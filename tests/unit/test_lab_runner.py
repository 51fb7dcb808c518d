"""The growth lab's load runner and report (extproc/lab/runner, extproc/lab/report).

The runner is driven against a fake OpenAI-style HTTP/1.1 server in this process (asyncio
streams, keep-alive, chunked SSE): open-loop timing, retries and backoff with the retry header,
TTFT of a stream, header and usage capture, the bounded duration. The report's arithmetic is
checked on synthetic results whose numbers are worked out by hand, then its charts and page.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from extproc.lab import configs
from extproc.lab.report import compute
from extproc.lab.report.build import build
from extproc.lab.report.charts import CHARTS
from extproc.lab.runner import scrape
from extproc.lab.runner.driver import backoff, drive, origin_of, select
from extproc.lab.runner.exchange import request_body
from extproc.lab.runner.run import Target, run_scale
from extproc.lab.workload.plan import PlannedRequest, RetryPolicy


# --- a fake OpenAI endpoint -------------------------------------------------------------------

class FakeServer:
    """HTTP/1.1 keep-alive server; what it does is chosen by the body's ``model``:

    * ``json``: a chat completion with usage (5 prompt, 7 completion), tier/cache headers;
    * ``sse``: a stream: role chunk at once, content after ``sse_delay`` s, then usage, ``[DONE]``;
    * ``slow``: ``json`` after ``slow_s`` seconds;
    * ``flaky``: 503 the first ``fail_times`` attempts of each ``x-test-id``, then ``json``;
    * ``limited``: 429 with ``Retry-After: 0`` once per ``x-test-id``, then ``json``;
    * ``bad``: 400 with OpenAI's error JSON.
    """

    def __init__(self):
        self.arrivals: list[dict] = []  # {t, model, headers, body, conn}
        self.sse_delay = 0.2
        self.slow_s = 1.0
        self.fail_times = 1
        self.connections = 0
        self._tries: dict[str, int] = {}
        self.server = None
        self.t0 = time.perf_counter()

    async def start(self) -> "FakeServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                headers = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b""):
                        break
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = json.loads(await reader.readexactly(int(headers.get("content-length", 0))) or b"{}")
                self.arrivals.append({"t": time.perf_counter() - self.t0, "path": line.split()[1].decode(),
                                      "model": body.get("model"), "headers": headers, "body": body, "conn": conn})
                await self._answer(writer, body, headers)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _send(self, writer, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
                     f"{extra}\r\n".encode() + data)
        await writer.drain()

    def _completion(self) -> dict:
        return {"id": "c1", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}

    async def _answer(self, writer, body: dict, headers: dict) -> None:
        model = body.get("model")
        key = headers.get("x-test-id", "")
        tries = self._tries[key] = self._tries.get(key, 0) + 1
        ok_headers = {"x-extproc-tier": "large", "x-extproc-cache": "miss", "x-extproc-tier-reason": "pinned",
                      "x-unrelated": "not captured"}
        if model == "slow":
            await asyncio.sleep(self.slow_s)
        if model == "flaky" and tries <= self.fail_times:
            return await self._send(writer, 503, {"error": {"message": "x", "type": "server_error",
                                                            "code": "upstream_unavailable"}})
        if model == "limited" and tries == 1:
            return await self._send(writer, 429, {"error": {"message": "x", "type": "requests",
                                                            "code": "rate_limit_exceeded"}}, {"retry-after": "0"})
        if model == "bad":
            return await self._send(writer, 400, {"error": {"message": "x", "type": "invalid_request_error",
                                                            "code": "unsupported_parameter"}})
        if model != "sse":
            return await self._send(writer, 200, self._completion(), ok_headers)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                     b"x-extproc-tier: medium\r\nx-extproc-cache: miss\r\n\r\n")

        async def chunk(data: dict | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            event = f"data: {text}\n\n".encode()
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()

        base = {"id": "s", "object": "chat.completion.chunk", "usage": None}
        await chunk({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        writer.write(b"3\r\n: \n\r\n")  # a comment: not content
        await asyncio.sleep(self.sse_delay)
        await chunk({**base, "choices": [{"index": 0, "delta": {"content": "hi"}}]})
        await chunk({**base, "choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            await chunk({**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
        await chunk("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.fixture
async def fake():
    server = await FakeServer().start()
    yield server
    await server.close()


def planned(index: int, at: float, model: str = "json", *, stream: bool = False, retry: RetryPolicy | None = None,
            difficulty: str = "small", test_id: str | None = None) -> PlannedRequest:
    return PlannedRequest(
        at=at, index=index, tenant="t1", workflow="wf", service="svc", session=f"s{index}", turn=0,
        endpoint="/v1/chat/completions", body={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        stream=stream, difficulty=difficulty, kind="fresh", retry=retry or RetryPolicy(timeout_s=5, retries=0),
        headers={"x-test-id": test_id or str(index)})


# --- the driver ----------------------------------------------------------------------------

async def test_open_loop_requests_leave_at_their_planned_times_whatever_the_answers(fake):
    fake.slow_s = 0.5
    plan = [planned(i, 0.1 + 0.15 * i, "slow") for i in range(5)]  # each answer takes longer than the gap
    fake.t0 = time.perf_counter()
    outcome = await drive(plan, fake.url, duration=5, drain_s=5)
    assert [r.outcome for r in outcome.results] == ["ok"] * 5
    starts = [a["t"] for a in fake.arrivals]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(abs(g - 0.15) < 0.06 for g in gaps), gaps  # not 0.5: nobody waited for an answer
    assert all(abs(r.send_lag_s) < 0.05 for r in outcome.results)
    assert all(0.45 < r.latency_s < 0.9 for r in outcome.results)


async def test_json_answer_measured_usage_headers_and_ttft_equal_latency(fake):
    outcome = await drive([planned(0, 0.0)], fake.url, duration=1)
    result = outcome.results[0]
    attempt = result.final
    assert result.outcome == "ok" and attempt.status == 200
    assert (attempt.prompt_tokens, attempt.completion_tokens) == (5, 7)
    assert attempt.ttft_s == attempt.latency_s
    assert attempt.headers == {"x-extproc-tier": "large", "x-extproc-cache": "miss", "x-extproc-tier-reason": "pinned"}
    line = result.to_json()
    assert line["tier"] == "large" and line["cache"] == "miss" and line["prompt_tokens"] == 5
    assert fake.arrivals[0]["headers"]["x-stainless-retry-count"] == "0"
    assert fake.arrivals[0]["body"]["stream"] is False and "stream_options" not in fake.arrivals[0]["body"]


async def test_sse_ttft_is_the_first_content_chunk_and_usage_is_asked_for(fake):
    fake.sse_delay = 0.3
    outcome = await drive([planned(0, 0.0, "sse", stream=True)], fake.url, duration=1)
    attempt = outcome.results[0].final
    assert outcome.results[0].outcome == "ok", attempt
    # the role chunk and the comment came at once; the first text 0.3 s later
    assert 0.28 < attempt.ttft_s < 0.6
    assert attempt.chunks == 2
    assert (attempt.prompt_tokens, attempt.completion_tokens) == (3, 2)
    assert attempt.headers["x-extproc-tier"] == "medium"
    sent = fake.arrivals[0]["body"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_5xx_retried_with_backoff_and_the_retry_header(fake):
    fake.fail_times = 2
    policy = RetryPolicy(timeout_s=5, retries=3, backoff_s=0.1, backoff_factor=2.0)
    outcome = await drive([planned(0, 0.0, "flaky", retry=policy)], fake.url, duration=1, drain_s=5)
    result = outcome.results[0]
    assert result.outcome == "ok" and result.retries == 2
    assert [a.status for a in result.attempts] == [503, 503, 200]
    assert result.attempts[0].error == "upstream_unavailable"
    assert [a["headers"]["x-stainless-retry-count"] for a in fake.arrivals] == ["0", "1", "2"]
    t = [a["t"] for a in fake.arrivals]
    assert 0.09 < t[1] - t[0] < 0.2 and 0.19 < t[2] - t[1] < 0.3  # 0.1 then 0.2 s
    assert len({a["conn"] for a in fake.arrivals}) == 1  # one kept-alive connection


async def test_timeouts_retried_then_given_up(fake):
    fake.slow_s = 1.0
    policy = RetryPolicy(timeout_s=0.2, retries=2, backoff_s=0.05, backoff_factor=1.0)
    outcome = await drive([planned(0, 0.0, "slow", retry=policy)], fake.url, duration=1, drain_s=5)
    result = outcome.results[0]
    assert result.outcome == "error"
    assert [a.error for a in result.attempts] == ["timeout"] * 3
    assert all(0.18 < a.latency_s < 0.4 for a in result.attempts)
    assert len(fake.arrivals) == 3


async def test_429_honours_retry_after_and_4xx_is_not_retried(fake):
    policy = RetryPolicy(timeout_s=5, retries=2, backoff_s=5.0)  # Retry-After: 0 beats the 5 s backoff
    plan = [planned(0, 0.0, "limited", retry=policy), planned(1, 0.0, "bad", retry=policy)]
    started = time.perf_counter()
    outcome = await drive(plan, fake.url, duration=1, drain_s=5)
    assert time.perf_counter() - started < 2
    limited, bad = outcome.results
    assert limited.outcome == "ok" and [a.status for a in limited.attempts] == [429, 200]
    assert bad.outcome == "error" and len(bad.attempts) == 1 and bad.final.error == "unsupported_parameter"


async def test_duration_and_max_requests_bound_the_run(fake):
    fake.slow_s = 10.0
    plan = [planned(0, 0.0, "slow"), planned(1, 0.1), planned(2, 0.2), planned(3, 5.0)]
    started = time.perf_counter()
    outcome = await drive(plan, fake.url, duration=1.0, drain_s=0.5)
    assert time.perf_counter() - started < 2.5  # 1 s + 0.5 s drain, not the 10 s answer nor the 5 s arrival
    assert [r.index for r in outcome.results] == [0, 1, 2]  # planned at 5 s: not sent
    assert [r.outcome for r in outcome.results] == ["unfinished", "ok", "ok"]
    cut_short = outcome.results[0].attempts
    assert len(cut_short) == 1 and cut_short[0].error == "cancelled" and 1.3 < cut_short[0].latency_s < 2.0
    assert [r.index for r in select(plan, 1.0, max_requests=2)] == [0, 1]


def test_helpers():
    assert origin_of("http://h:1/v1/") == "http://h:1" and origin_of("http://h:1") == "http://h:1"
    policy = RetryPolicy(backoff_s=0.5, backoff_factor=2.0)
    assert [backoff(policy, n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff(policy, 1, "3") == 3.0 and backoff(policy, 1, "120") == 0.5 and backoff(policy, 2, "soon") == 1.0
    body = request_body({"model": "m", "stream_options": {"include_usage": False}}, True)
    assert body["stream_options"] == {"include_usage": False}  # the plan's own choice is kept


# --- scrapes ---------------------------------------------------------------------------------

METRICS_BEFORE = """# TYPE extproc_requests counter
extproc_requests_total{tenant="a",workflow="w",tier="large",outcome="completed"} 3
# TYPE nv_inference_count counter
nv_inference_count{model="llm-large",version="1"} 10
# TYPE g gauge
g 5
# TYPE h histogram
h_bucket{le="1"} 1
h_sum 2
h_count 1
"""
METRICS_AFTER = METRICS_BEFORE.replace("} 3", "} 8").replace("} 10", "} 14").replace("h_sum 2", "h_sum 4.5")


def test_scrape_delta_keeps_cumulative_samples_only():
    before, after = scrape.cumulative_samples(METRICS_BEFORE), scrape.cumulative_samples(METRICS_AFTER)
    d = scrape.delta(before, after)
    assert d == {'extproc_requests_total{outcome="completed",tenant="a",tier="large",workflow="w"}': 5.0,
                 'nv_inference_count_total{model="llm-large",version="1"}': 4.0, "h_sum": 2.5}
    assert scrape.total(d, "extproc_requests_total", tier="large") == 5.0
    assert scrape.by_label(d, "nv_inference_count_total", "model") == {"llm-large": 4.0}
    assert scrape.delta({"c": 10.0}, {"c": 4.0}) == {"c": 4.0}  # restarted: counts from zero


async def test_run_scale_writes_lines_and_summary_with_metric_deltas(fake, tmp_path):
    calls = {"n": 0}

    async def metrics(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        calls["n"] += 1
        text = (METRICS_BEFORE if calls["n"] == 1 else METRICS_AFTER).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                     % len(text) + text)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(metrics, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/metrics"
    try:
        target = Target(fake.url, gateway_metrics_url=url, triton_metrics_url=None)
        summary = await run_scale([planned(0, 0.0), planned(1, 0.05, "sse", stream=True)], target, tmp_path,
                                  duration=1, meta={"mode": "gateway", "scale": 2}, settle_s=1.5)
    finally:
        server.close()
        await server.wait_closed()
    lines = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 1] and lines[1]["stream"] is True
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary and saved["mode"] == "gateway" and saved["outcomes"] == {"ok": 2, "error": 0, "unfinished": 0}
    assert scrape.total(saved["metrics"]["gateway"]["delta"], "extproc_requests_total") == 5.0
    assert saved["metrics"]["triton"] == {"delta": None, "error": "not configured"}


# --- the report's arithmetic -------------------------------------------------------------

PRICES = {"tiers": {"small": {"prompt_per_1k": 1.0, "completion_per_1k": 2.0},
                    "large": {"prompt_per_1k": 10.0, "completion_per_1k": 20.0}},
          "gpu_hour_usd": 3600.0}  # 1 USD per busy second: easy to check


def attempt(number, status=200, *, tier="large", cache="miss", prompt=100, completion=50, error=None, cut=None):
    headers = {"x-extproc-tier": tier}
    if cache:
        headers["x-extproc-cache"] = cache
    if cut:
        headers["x-extproc-tokens-cut"] = str(cut)
    return {"number": number, "started": 0.0, "status": status, "latency_s": 1.0, "ttft_s": 0.5,
            "prompt_tokens": prompt if status == 200 else None, "completion_tokens": completion if status == 200 else None,
            "headers": headers, "error": error}


def request(index, attempts, *, outcome="ok", latency=1.0, ttft=0.5, difficulty="small", stream=False):
    final = attempts[-1] if attempts else {}
    return {"index": index, "at": 0.0, "outcome": outcome, "attempts": attempts, "latency_s": latency,
            "ttft_s": ttft, "send_lag_s": 0.0, "difficulty": difficulty, "stream": stream,
            "tier": (final.get("headers") or {}).get("x-extproc-tier"),
            "cache": (final.get("headers") or {}).get("x-extproc-cache"),
            "prompt_tokens": final.get("prompt_tokens"), "completion_tokens": final.get("completion_tokens")}


def synthetic_run(mode="gateway", scale=1, cost_scale=1.0):
    requests = [
        # large, first try: 100 × 10/1000 + 50 × 20/1000 = 1 + 1 = 2 USD
        request(0, [attempt(0)], latency=1.0, ttft=0.2, difficulty="large"),
        # small after a timeout: the retry's 100 × 1/1000 + 50 × 2/1000 = 0.2 USD is retry cost
        request(1, [attempt(0, None, error="timeout"), attempt(1, tier="small")], latency=3.0, ttft=2.5,
                difficulty="large"),
        # an exact-cache hit answering a retry: no cost, a retry suppressed
        request(2, [attempt(0, 503, error="upstream_unavailable"), attempt(1, cache="hit")], latency=2.0, ttft=2.0),
        # failed for good
        request(3, [attempt(0, 400, error="bad")], outcome="error"),
        request(4, [], outcome="unfinished", latency=None, ttft=None),
        # small with tokens cut: 10 × 1/1000 + 5 × 2/1000 = 0.02 USD
        request(5, [attempt(0, tier="small", prompt=10, completion=5, cut=30)], latency=4.0, ttft=1.0, stream=True),
    ]
    for r in requests:
        for a in r["attempts"]:
            if a["prompt_tokens"]:
                a["prompt_tokens"] = int(a["prompt_tokens"] * cost_scale)
    gateway = {'extproc_cost_usd_total{kind="embeddings",tier="small"}': 0.04,
               'extproc_cost_usd_total{kind="overhead",tier="large"}': 0.08,
               'extproc_cost_usd_total{kind="prompt",tier="large"}': 1.0,
               'extproc_cache_lookups_total{layer="exact",result="hit"}': 1.0,
               'extproc_cache_lookups_total{layer="exact",result="miss"}': 3.0,
               'extproc_requests_total{outcome="completed",tier="large"}': 4.0}
    triton = {'nv_inference_count_total{model="llm-large",version="1"}': 12.0,
              'nv_inference_exec_count_total{model="llm-large",version="1"}': 6.0,
              'nv_inference_compute_infer_duration_us_total{model="llm-large",version="1"}': 4e6,
              'nv_inference_count_total{model="llm-small",version="1"}': 4.0,
              'nv_inference_exec_count_total{model="llm-small",version="1"}': 4.0,
              'nv_inference_compute_infer_duration_us_total{model="llm-small",version="1"}': 1000.0,
              'reference_llm_decode_seconds_total{model="llm-small"}': 0.3,
              'reference_llm_prefill_seconds_total{model="llm-small"}': 0.1}
    envoy = {'envoy_cluster_health_check_success_total{envoy_cluster_name="tier_large"}': 2.0}
    summary = {"mode": mode, "scale": scale, "duration_s": 6.0, "wall_s": 8.0, "prices": PRICES,
               "metrics": {"gateway": {"delta": gateway}, "triton": {"delta": triton}, "envoy": {"delta": envoy}}}
    return requests, summary


def test_report_arithmetic_on_synthetic_results():
    r = compute.summarise(*synthetic_run())
    assert (r["requests"], r["answered"], r["errors"], r["unfinished"]) == (6, 4, 1, 1)
    assert r["error_rate"] == pytest.approx(1 / 5)
    assert r["cost_usd"] == pytest.approx({"prompt": 1.01, "completion": 1.01, "retries": 0.2,
                                           "embeddings": 0.04, "overhead": 0.08})
    assert r["cost_total_usd"] == pytest.approx(2.34)
    assert r["cost_per_request_usd"] == pytest.approx(2.34 / 4)
    assert r["booked_per_request_usd"] == pytest.approx(1.12 / 4)
    # large: Triton's C × E / I = 4 s × 6 / 12 = 2 s; small: the engine's own 0.4 s (Triton's ~0)
    assert r["gpu"]["llm-large"]["busy_s"] == pytest.approx(2.0)
    assert r["gpu"]["llm-large"]["inferences"] == 10.0 and r["gpu"]["llm-large"]["health_checks"] == 2.0
    assert r["gpu"]["llm-small"]["busy_s"] == pytest.approx(0.4)
    assert r["gpu"]["llm-small"]["triton_busy_s"] == pytest.approx(0.001)
    assert r["gpu_seconds_per_request"] == pytest.approx(2.4 / 4)
    assert r["gpu_cost_per_request_usd"] == pytest.approx(2.4 / 4)  # 1 USD per second
    assert r["latency_p50_s"] == pytest.approx(2.5) and r["latency_p95_s"] == pytest.approx(3.85)
    assert r["ttft_p50_s"] == pytest.approx(1.5) and r["stream_ttft_p95_s"] == pytest.approx(1.0)
    assert r["throughput_rps"] == pytest.approx(4 / 8) and r["offered_rps"] == pytest.approx(1.0)
    assert r["tier_mix"] == {"large": 0.5, "small": 0.5}
    assert r["cache_hit_rate"] == pytest.approx(0.25)
    assert r["cache_layers"] == {"exact": {"lookups": 4.0, "hits": 1.0, "hit_rate": 0.25}}
    assert (r["attempts"], r["retries"], r["timeouts"], r["retries_suppressed"]) == (7, 2, 1, 1)
    assert r["large_labelled"] == 2 and r["large_share_on_large"] == 0.5
    assert r["tokens_cut"] == 0.0  # the gateway's counter wins over the header when scraped
    requests, summary = synthetic_run()
    summary["metrics"]["gateway"]["delta"] = None
    no_gateway = compute.summarise(requests, summary)
    assert no_gateway["tokens_cut"] == 30 and no_gateway["cost_usd"]["overhead"] == 0.0
    assert compute.percentile([], 50) is None and compute.percentile([3.0], 95) == 3.0


def test_compare_naive_against_gateway_and_growth():
    runs = [compute.summarise(*synthetic_run("naive", 1, 1.0)), compute.summarise(*synthetic_run("naive", 5, 3.0)),
            compute.summarise(*synthetic_run("gateway", 1, 1.0)), compute.summarise(*synthetic_run("gateway", 5, 1.0))]
    result = compute.compare(runs)
    assert [row["scale"] for row in result["by_scale"]] == [1, 5]
    assert result["by_scale"][0]["gateway_over_naive"] == pytest.approx(1.0)
    assert result["by_scale"][1]["gateway_over_naive"] < 1.0
    assert result["growth"]["gateway"]["cost_factor"] == pytest.approx(1.0)
    assert result["growth"]["naive"]["cost_factor"] > 1.5


def write_run(root: Path, mode: str, scale: float, cost_scale: float = 1.0) -> None:
    requests, summary = synthetic_run(mode, scale, cost_scale)
    run = root / mode / f"scale-{scale:g}"
    run.mkdir(parents=True)
    (run / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    (run / "summary.json").write_text(json.dumps(summary))


def test_report_files_charts_and_html(tmp_path):
    for mode in ("naive", "gateway"):
        for scale, factor in ((1, 1.0), (2, 1.5), (5, 3.0)):
            write_run(tmp_path, mode, scale, factor if mode == "naive" else 1.0)
    report = build(tmp_path)
    assert report.out_dir == tmp_path / "report"
    assert sorted(p.name for p in report.charts) == sorted(CHARTS)
    for chart in report.charts:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    data = json.loads(report.json_path.read_text())
    assert [(r["mode"], r["scale"]) for r in data["runs"]] == [("naive", 1), ("naive", 2), ("naive", 5),
                                                               ("gateway", 1), ("gateway", 2), ("gateway", 5)]
    assert len(data["comparison"]["by_scale"]) == 3
    page = report.html_path.read_text()
    assert "Cost per 1,000 answered requests (USD, per-token prices)" in page and all(f"src='{c}'" in page for c in CHARTS)
    assert "5x: gateway $" in page
    again = build(tmp_path)  # the report's own directory is not read as a run
    assert len(again.runs) == 6


def test_lab_report_command(tmp_path, capsys, monkeypatch):
    import argparse

    monkeypatch.setenv("COLUMNS", "250")  # rich: wide enough for every column
    from extproc.lab.report import command

    write_run(tmp_path, "naive", 1)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args([str(tmp_path), "--gpu-hour-usd", "7200"])) == 0
    out = capsys.readouterr().out
    # the GPU view: 2.4 busy s × 2 USD/s / 4 answered = 1.2 USD per request, 1200 per 1,000
    assert "Cost per 1,000 answered requests" in out and "1200.0000" in out
    assert command.run(parser.parse_args([str(tmp_path / "nothing")])) == 2


# --- configurations ---------------------------------------------------------------------

def test_lab_configs_naive_and_gateway_merge():
    naive = configs.naive_config()
    assert list(naive["tiers"]) == ["large"] and naive["default_tier"] == "large"
    assert [p["name"] for p in naive["plugins"]] == ["model_tiers", "usage_records", "metrics"]
    default = """
plugins:
  - {name: model_tiers}
  - {name: exact_cache, settings: {ttl: {default_seconds: 10}}}
  - {name: coalescing}
  - {name: usage_records}
  - {name: metrics}
"""
    merged = configs.gateway_config(default, [{"name": "semantic_cache", "settings": {"threshold": 0.9}},
                                              {"name": "context_caps", "settings": {"rules": []}},
                                              {"name": "exact_cache", "settings": {"ttl": {"default_seconds": 5}}}])
    assert [p["name"] for p in merged["plugins"]] == ["context_caps", "model_tiers", "exact_cache", "semantic_cache",
                                                      "coalescing", "usage_records", "metrics"]
    assert merged["plugins"][2]["settings"] == {"ttl": {"default_seconds": 5}}
    assert merged["costs"] == naive["costs"]
    with_file = configs.with_usage_file(merged, "/tmp/u.jsonl")
    assert with_file["plugins"][5]["settings"] == {"sink": "file", "path": "/tmp/u.jsonl"}
    with pytest.raises(ValueError, match="needs a name"):
        configs.add_plugins(merged, [{"settings": {}}])


def test_shipped_naive_config_is_valid():
    from extproc.framework.config import parse_config

    config = parse_config(configs.naive_config(), "naive.yaml")
    assert config.tiers["large"].model == "llm-large"
    for name in ("auto", "small", "medium", "llm-small", "large"):
        assert name == config.auto_model or name in ("large", *config.tiers["large"].aliases)
