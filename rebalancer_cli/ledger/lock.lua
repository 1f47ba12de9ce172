-- Lock funds for orders, each atomically with the check that its funds are available, in the order given
-- (each sees the locks granted before it). KEYS: hold, locks, done, fence (and sent, unused here).
-- ARGV: fence token ('' = none), ttl in ms, then triples (key, asset, amount).
-- Returns {'fenced', highest token} or {'ok', status...} with one status per triple: committed, held,
-- refused or granted.
local highest = fence_check(KEYS[4], ARGV[1])
if highest then return {'fenced', highest} end
for i = 5, #ARGV, 3 do dec_parse(ARGV[i]) end
local ttl = tonumber(ARGV[2])
local now = now_ms()
local out = {'ok'}
for i = 3, #ARGV, 3 do
  local key, asset, amount = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local status = 'granted'
  local existing = redis.call('HGET', KEYS[2], key)
  if redis.call('ZSCORE', KEYS[3], key) then
    status = 'committed'
  elseif existing and select(3, lock_parse(existing)) > now then
    status = 'held'
  elseif dec_cmp(available(KEYS[1], KEYS[2], asset, now, true), amount) < 0 then
    status = 'refused'
  else
    redis.call('HSET', KEYS[2], key, asset .. '\n' .. amount .. '\n' .. string.format('%d', now + ttl))
  end
  out[#out + 1] = status
end
return out
