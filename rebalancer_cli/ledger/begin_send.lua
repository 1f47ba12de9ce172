-- Right before orders leave: the sender still holds the newest fencing token, the kill switch is off, and
-- each order's lock is still in place (recovery by a successor did not take it back). Checked in one step, so
-- nothing can change between the checks and the answer; each order found `ok` is marked in the same step as
-- leaving (its time in `sent`), which a successor's recovery reads before it calls an order the exchange does
-- not know absent. One order, or the orders of a group leaving side by side.
-- KEYS: fence, halt, locks, sent. ARGV: fence token ('' = none), the sender's time in ms ('' = now), then the
-- orders' keys.
-- Returns {'fenced', highest token} | {'halted', reason} | {'ok', then per key 'ok' | 'unlocked'}.
local highest = fence_check(KEYS[1], ARGV[1])
if highest then return {'fenced', highest} end
local reason = redis.call('HGET', KEYS[2], 'reason')
if reason then return {'halted', reason} end
local now = now_ms()
local stamp = ARGV[2]
if stamp == nil or stamp == '' then stamp = string.format('%d', now) end
local out = {'ok'}
for i = 3, #ARGV do
  local record = redis.call('HGET', KEYS[3], ARGV[i])
  local live = false
  if record then
    local _, _, expires = lock_parse(record)
    live = expires > now
  end
  if live then
    redis.call('HSET', KEYS[4], ARGV[i], stamp)
    out[#out + 1] = 'ok'
  else
    out[#out + 1] = 'unlocked'
  end
end
return out
