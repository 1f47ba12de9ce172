-- Live locks as a flat list key, record, key, record... (read only). KEYS: locks.
local now = now_ms()
local out = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local _, _, expires = lock_parse(flat[i + 1])
  if expires > now then
    out[#out + 1] = flat[i]
    out[#out + 1] = flat[i + 1]
  end
end
return out
