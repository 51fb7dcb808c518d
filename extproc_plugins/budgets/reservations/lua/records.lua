-- A reservation record is one string: its metric indexes, its amounts (space-separated), then its
-- counters, a line each. The index of reservations by due time (a sorted set) holds the reservation
-- key and its record, so an orphan can be swept after its record expired. Prepended to each script.
local function parse(record)
  local lines = {}
  for line in string.gmatch(record, '[^\n]+') do lines[#lines + 1] = line end
  local metric, reserved, keys = {}, {}, {}
  for w in string.gmatch(lines[1] or '', '%S+') do metric[#metric + 1] = tonumber(w) end
  for w in string.gmatch(lines[2] or '', '%S+') do reserved[#reserved + 1] = tonumber(w) end
  for i = 3, #lines do keys[#keys + 1] = lines[i] end
  return metric, reserved, keys
end
