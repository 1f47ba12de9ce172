-- Apply fills and drop their locks, once per key, for one or several orders in one atomic step.
-- KEYS: hold, locks, done, fence, sent (the order's mark of having left, dropped with its lock), memory.
-- ARGV: fence token ('' = none), '1' to store the planner's memory (else ''), the memory, then per order: key,
-- number of debits d, number of credits c, then d pairs (asset, amount) debited and c pairs (asset, amount)
-- credited.
-- Returns {'fenced', highest token} or {'ok', then per order: 'duplicate' | 'committed'}.
local highest = fence_check(KEYS[4], ARGV[1])
if highest then return {'fenced', highest} end
if ARGV[2] == '1' then redis.call('SET', KEYS[6], ARGV[3]) end
local out = {'ok'}
local i = 4
while i <= #ARGV do
  local key = ARGV[i]
  local ndebit, ncredit = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local first, last = i + 3, i + 2 + 2 * (ndebit + ncredit)
  i = last + 1
  if redis.call('ZSCORE', KEYS[3], key) then
    out[#out + 1] = 'duplicate'
  else
    -- Every new holding is computed before the first write, so a bad value cannot leave half a fill behind.
    local new = {}
    local order = {}
    for j = first, last, 2 do
      local asset, amount = ARGV[j], ARGV[j + 1]
      if new[asset] == nil then
        new[asset] = redis.call('HGET', KEYS[1], asset) or '0'
        order[#order + 1] = asset
      end
      if j < first + 2 * ndebit then
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
    out[#out + 1] = 'committed'
  end
end
return out
