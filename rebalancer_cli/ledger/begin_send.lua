-- Right before an order leaves: the sender still holds the newest fencing token, the kill switch is off, and
-- its lock is still in place (recovery by a successor did not take it back). Checked in one step, so nothing
-- can change between the checks and the answer; on `ok` the same step marks the order as leaving (its time in
-- `sent`), which a successor's recovery reads before it calls an order the exchange does not know absent.
-- KEYS: fence, halt, locks, sent. ARGV: fence token ('' = none), key, the sender's time in ms ('' = now).
-- Returns {status, detail}: fenced (detail: highest token), halted (detail: reason), unlocked, ok.
local highest = fence_check(KEYS[1], ARGV[1])
if highest then return {'fenced', highest} end
local reason = redis.call('HGET', KEYS[2], 'reason')
if reason then return {'halted', reason} end
local record = redis.call('HGET', KEYS[3], ARGV[2])
if not record then return {'unlocked', ''} end
local _, _, expires = lock_parse(record)
local now = now_ms()
if expires <= now then return {'unlocked', ''} end
local stamp = ARGV[3]
if stamp == nil or stamp == '' then stamp = string.format('%d', now) end
redis.call('HSET', KEYS[4], ARGV[2], stamp)
return {'ok', ''}
