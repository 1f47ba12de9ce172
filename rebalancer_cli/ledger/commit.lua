-- Apply a fill and drop its lock, once per key.
-- KEYS: hold, locks, done, fence, sent (the order's mark of having left, dropped with its lock). ARGV: fence token ('' = none), key, number of debits n,
-- then n pairs (asset, amount) debited, then pairs (asset, amount) credited.
-- Returns {status, detail}: fenced (detail: highest token), duplicate, committed.
local highest = fence_check(KEYS[4], ARGV[1])
if highest then return {'fenced', highest} end
local key = ARGV[2]
if redis.call('ZSCORE', KEYS[3], key) then return {'duplicate', ''} end
-- Every new holding is computed before the first write, so a bad value cannot leave half a fill behind.
local new = {}
local order = {}
local ndebit = tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  local asset, amount = ARGV[i], ARGV[i + 1]
  if new[asset] == nil then
    new[asset] = redis.call('HGET', KEYS[1], asset) or '0'
    order[#order + 1] = asset
  end
  if i < 4 + 2 * ndebit then
    new[asset] = dec_sub(new[asset], amount)
  else
    new[asset] = dec_add(new[asset], amount)
  end
end
for _, asset in ipairs(order) do
  redis.call('HSET', KEYS[1], asset, new[asset])
end
redis.call('HDEL', KEYS[2], key)
redis.call('HDEL', KEYS[5], key)
redis.call('ZADD', KEYS[3], now_ms(), key)
return {'committed', ''}
