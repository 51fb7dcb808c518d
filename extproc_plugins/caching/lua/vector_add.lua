-- KEYS: v, lru, ver. ARGV: id, blob, now_ms, max_per_scope, scope_ttl_ms, token.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if extra > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], extra)
  for i = 1, #old, 2 do redis.call('HDEL', KEYS[1], old[i]) end
end
redis.call('SET', KEYS[3], ARGV[6])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
return extra
