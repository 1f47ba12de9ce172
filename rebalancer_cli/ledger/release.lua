-- Drop a lock (the order failed or was never sent). KEYS: locks, fence. ARGV: fence token, key.
local highest = fence_check(KEYS[2], ARGV[1])
if highest then return {'fenced', highest} end
redis.call('HDEL', KEYS[1], ARGV[2])
return {'ok', ''}
