-- KEYS: n counters, m guarded records, the reservation record, the due index. ARGV: n, m, each
-- counter's metric index, limit (-1: none) and expiry (Unix ms) as space-separated lists, the m
-- expected record values ('0': absent, '1' .. value), the reservation's TTL in ms, the amount per
-- metric (space-separated), how many orphans to sweep first (0: none). A guarded record that
-- changed: nothing charged, returns {2, j, current values...}. Else all or nothing: {1, 0,
-- levels...} or {0, i, levels...}. Few redis.call()s (one MGET, two INCRBYs a counter, SET, ZADD):
-- their count is the script's cost.

if redis.replicate_commands then redis.replicate_commands() end  -- TIME before writes (Redis < 5)
local n = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local res, due = KEYS[n + m + 1], KEYS[n + m + 2]
local sweep = tonumber(ARGV[8 + m])
if sweep > 0 then
  -- orphans (never settled within their TTL): their worst case stays charged, as spent
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, sweep)) do
    local cut = string.find(member, '\n', 1, true)
    if redis.call('EXISTS', string.sub(member, 1, cut - 1)) == 0 then
      local _, reserved, keys = parse(string.sub(member, cut + 1))
      for i = 1, #keys do
        local hk = keys[i] .. ':held'
        if redis.call('EXISTS', hk) == 1 then redis.call('DECRBY', hk, reserved[i]) end
      end
    end
    redis.call('ZREM', due, member)
  end
end
if m > 0 then
  local current = redis.call('MGET', unpack(KEYS, n + 1, n + m))
  for j = 1, m do
    if (current[j] and ('1' .. current[j]) or '0') ~= ARGV[5 + j] then
      local out = {2, j}
      for k = 1, m do out[2 + k] = current[k] and ('1' .. current[k]) or '0' end
      return out
    end
  end
end
local function words(s)
  local t = {}
  for w in string.gmatch(s, '%S+') do t[#t + 1] = w end
  return t
end
local metric, limit, expire = words(ARGV[3]), words(ARGV[4]), words(ARGV[5])
local per_metric = words(ARGV[7 + m])
local levels, amounts = {}, {}
if n > 0 then
  local current = redis.call('MGET', unpack(KEYS, 1, n))
  for i = 1, n do
    local a = per_metric[tonumber(metric[i]) + 1]
    local level = tonumber(current[i] or '0')
    local lim = tonumber(limit[i])
    amounts[i] = a
    levels[i] = level
    if lim >= 0 and level + tonumber(a) > lim then
      return {0, i, unpack(levels)}
    end
  end
end
for i = 1, n do
  local a = amounts[i]
  local amount = tonumber(a)
  local held = KEYS[i] .. ':held'
  -- a counter's expiry is set when this reservation created it (its value is then the amount)
  if redis.call('INCRBY', KEYS[i], a) == amount then redis.call('PEXPIREAT', KEYS[i], expire[i]) end
  if redis.call('INCRBY', held, a) == amount then redis.call('PEXPIREAT', held, expire[i]) end
end
if n > 0 then
  local ttl = tonumber(ARGV[6 + m])
  local record = ARGV[3] .. '\n' .. table.concat(amounts, ' ') .. '\n' .. table.concat(KEYS, '\n', 1, n)
  redis.call('SET', res, record, 'PX', ttl)
  local t = redis.call('TIME')
  redis.call('ZADD', due, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl, res .. '\n' .. record)
end
return {1, 0, unpack(levels)}
