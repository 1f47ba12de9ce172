-- Drop a lock (the order failed or was never sent), and its mark of having left.
-- KEYS: locks, fence, sent. ARGV: fence token, key.
local highest = fence_check(KEYS[2], ARGV[1])
if highest then return {'fenced', highest} end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return {'ok', ''}
