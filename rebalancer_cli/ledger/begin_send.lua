-- Right before an order leaves: the sender still holds the newest fencing token, the kill switch is off, and
-- its lock is still in place (recovery by a successor did not take it back). Checked in one step, so nothing
-- can change between the checks and the answer.
-- KEYS: fence, halt, locks. ARGV: fence token ('' = none), key.
-- Returns {status, detail}: fenced (detail: highest token), halted (detail: reason), unlocked, ok.
local highest = fence_check(KEYS[1], ARGV[1])
if highest then return {'fenced', highest} end
local reason = redis.call('HGET', KEYS[2], 'reason')
if reason then return {'halted', reason} end
local record = redis.call('HGET', KEYS[3], ARGV[2])
if not record then return {'unlocked', ''} end
local _, _, expires = lock_parse(record)
if expires <= now_ms() then return {'unlocked', ''} end
return {'ok', ''}
