-- wrk script: POST request bodies read from a file (one JSON body per line), in turn.
--
--   BENCH_BODIES=/tmp/bodies.jsonl wrk -t1 -c1 -d10s --latency -s benchmarks/wrk/bodies.lua http://127.0.0.1:10000
--
-- Environment: BENCH_BODIES (required), BENCH_PATH (default /v1/chat/completions),
-- BENCH_AUTH (Authorization header value, optional). One body = the same request every time.
-- The last line is `WRK_JSON {...}` (latencies in microseconds), like chat.lua, plus the count of
-- non-2xx answers.

local bodies = {}
for line in io.lines(os.getenv("BENCH_BODIES")) do
  if #line > 0 then bodies[#bodies + 1] = line end
end
assert(#bodies > 0, "BENCH_BODIES has no bodies")
local path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
local headers = {["Content-Type"] = "application/json"}
if os.getenv("BENCH_AUTH") then headers["Authorization"] = os.getenv("BENCH_AUTH") end
local i = 0

request = function()
  i = i % #bodies + 1
  return wrk.format("POST", path, headers, bodies[i])
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
