-- Replace holdings with the exchange's truth; locks stay. KEYS: hold, fence.
-- ARGV: fence token, then pairs (asset, amount).
local highest = fence_check(KEYS[2], ARGV[1])
if highest then return {'fenced', highest} end
for i = 3, #ARGV, 2 do dec_parse(ARGV[i]) end
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return {'ok', ''}
