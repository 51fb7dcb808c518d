-- wrk script: POST an OpenAI chat completion, print a machine-readable summary.
--
--   wrk -t1 -c1 -d10s --latency -s benchmarks/wrk/chat.lua http://127.0.0.1:10000
--
-- Environment: BENCH_MODEL (default "stub"), BENCH_PATH (default /v1/chat/completions),
-- BENCH_STREAM=1 for "stream": true, BENCH_MAX_TOKENS (default 16).
-- The last line is `WRK_JSON {...}` (latencies in microseconds), parsed by
-- benchmarks/bench_extproc_hop.py.

local model = os.getenv("BENCH_MODEL") or "stub"
local stream = os.getenv("BENCH_STREAM") == "1"
local max_tokens = tonumber(os.getenv("BENCH_MAX_TOKENS") or "16")

wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
wrk.body = string.format(
  '{"model":"%s","messages":[{"role":"system","content":"You are terse."},' ..
  '{"role":"user","content":"Say hello in five words."}],"max_tokens":%d%s}',
  model, max_tokens, stream and ',"stream":true' or '')

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d,' ..
    '"lat_mean_us":%.1f,"lat_stdev_us":%.1f,"lat_min_us":%d,"lat_max_us":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
