-- Lock funds for one order, atomically with the check that they are available.
-- KEYS: hold, locks, done, fence (and sent, unused here). ARGV: fence token ('' = none), key, asset, amount, ttl in ms.
-- Returns {status, detail}: fenced (detail: highest token), committed, held, refused (detail: available),
-- granted.
local highest = fence_check(KEYS[4], ARGV[1])
if highest then return {'fenced', highest} end
local key, asset, amount = ARGV[2], ARGV[3], ARGV[4]
dec_parse(amount)
if redis.call('ZSCORE', KEYS[3], key) then return {'committed', ''} end
local now = now_ms()
local existing = redis.call('HGET', KEYS[2], key)
if existing then
  local _, _, expires = lock_parse(existing)
  if expires > now then return {'held', ''} end
end
local free = available(KEYS[1], KEYS[2], asset, now, true)
if dec_cmp(free, amount) < 0 then return {'refused', free} end
local expires = now + tonumber(ARGV[5])
redis.call('HSET', KEYS[2], key, asset .. '\n' .. amount .. '\n' .. string.format('%d', expires))
return {'granted', ''}
