-- Store the planner's memory under the fence. KEYS: memory, fence. ARGV: fence token, value.
local highest = fence_check(KEYS[2], ARGV[1])
if highest then return {'fenced', highest} end
redis.call('SET', KEYS[1], ARGV[2])
return {'ok', ''}
