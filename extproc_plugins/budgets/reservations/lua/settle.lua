-- KEYS[1]: the reservation record; KEYS[2]: the due index. ARGV[1]: 'release'; or 'metric' and the
-- real amount per metric (space-separated; negative: keep the reserved amount); or 'key' and
-- (counter key, real amount) pairs (a reserved counter not named keeps its reserved amount). Once
-- only: a reservation already settled (or expired: orphaned) is left alone and 0 returned. A
-- counter whose window is over (gone) is not brought back.

local record = redis.call('GET', KEYS[1])
if not record then return 0 end
local metric, reserved, keys = parse(record)
local n = #keys
local mode = ARGV[1]
local actual = {}
if mode == 'metric' then
  local j = 0
  for w in string.gmatch(ARGV[2], '%S+') do actual[j] = tonumber(w); j = j + 1 end
elseif mode == 'key' then
  for i = 2, #ARGV, 2 do actual[ARGV[i]] = tonumber(ARGV[i + 1]) end
end
if n > 0 then
  local names = {}
  for i = 1, n do
    names[2 * i - 1] = keys[i]
    names[2 * i] = keys[i] .. ':held'
  end
  local current = redis.call('MGET', unpack(names))
  for i = 1, n do
    local final = 0
    if mode == 'metric' then
      final = actual[metric[i]]
      if final == nil or final < 0 then final = reserved[i] end
    elseif mode == 'key' then
      final = actual[keys[i]] or reserved[i]
    end
    if final ~= reserved[i] and current[2 * i - 1] then redis.call('INCRBY', keys[i], final - reserved[i]) end
    if current[2 * i] then redis.call('DECRBY', names[2 * i], reserved[i]) end
  end
  redis.call('ZREM', KEYS[2], KEYS[1] .. '\n' .. record)
end
redis.call('DEL', KEYS[1])
return 1
