-- KEYS: v, ver. ARGV: the token the caller has. Returns {token} if unchanged, else {token, hash...}.
local token = redis.call('GET', KEYS[2])
if not token then return {false} end
if token == ARGV[1] then return {token} end
local all = redis.call('HGETALL', KEYS[1])
table.insert(all, 1, token)
return all
