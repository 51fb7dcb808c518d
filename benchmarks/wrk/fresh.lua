-- wrk script: POST chat completions whose prompt is new every time (every request a cache miss),
-- or, with BENCH_REPEAT=1, the same request every time (an exact-cache hit after the first).
--
--   BENCH_MODEL=small wrk -t1 -c16 -d5s --latency -s benchmarks/wrk/fresh.lua http://127.0.0.1:10000
--
-- Environment: BENCH_MODEL (default "small"), BENCH_MAX_TOKENS (default 1), BENCH_TAG (a string
-- of the run, so that a second run's prompts are new too), BENCH_REPEAT=1 (one repeated prompt).
-- The last line is `WRK_JSON {...}` (latencies in microseconds) with the count of non-2xx answers,
-- as benchmarks/wrk/bodies.lua prints it.

local model = os.getenv("BENCH_MODEL") or "small"
local max_tokens = tonumber(os.getenv("BENCH_MAX_TOKENS") or "1")
local tag = os.getenv("BENCH_TAG") or tostring(os.time())
local repeat_one = os.getenv("BENCH_REPEAT") == "1"
local headers = {["Content-Type"] = "application/json"}
local threads, counter, id = {}, 0, 0

setup = function(thread)
  id = id + 1
  thread:set("id", id)
  table.insert(threads, thread)
end

request = function()
  counter = counter + 1
  local prompt
  if repeat_one then
    prompt = "Say hello in five words (" .. tag .. ")."
  else
    prompt = string.format("Say one word about item %d-%d of run %s.", id or 0, counter, tag)
  end
  local body = string.format(
    '{"model":"%s","temperature":0,"max_tokens":%d,"messages":[{"role":"user","content":"%s"}]}',
    model, max_tokens, prompt)
  return wrk.format("POST", "/v1/chat/completions", headers, body)
end

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
