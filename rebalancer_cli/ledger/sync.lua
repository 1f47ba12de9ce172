-- Replace holdings with the exchange's truth; locks stay. KEYS: hold, fence, locks.
-- ARGV: fence token, '1' to leave the holdings alone while a live lock exists ('' otherwise), then pairs
-- (asset, amount). Returns {'ok'|'locked', ''}.
local highest = fence_check(KEYS[2], ARGV[1])
if highest then return {'fenced', highest} end
if ARGV[2] == '1' then
  local now = now_ms()
  local flat = redis.call('HVALS', KEYS[3])
  for i = 1, #flat do
    local _, _, expires = lock_parse(flat[i])
    if expires > now then return {'locked', ''} end
  end
end
for i = 4, #ARGV, 2 do dec_parse(ARGV[i]) end
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return {'ok', ''}
