-- Shared prelude of every ledger script (prepended by redis.py before registration).
--
-- Lua numbers are doubles, so amounts never become numbers here: they stay canonical decimal strings
-- ("-12.5", "0", "0.000000000000000001") and are added, subtracted and compared digit by digit.
-- Canonical form: optional '-', no leading zeros, no trailing fraction zeros, no '.' without digits
-- after it, and zero is always "0".

local function dec_parse(s)
  local neg = false
  if string.byte(s, 1) == 45 then
    neg = true
    s = string.sub(s, 2)
  end
  local ip, fp = s, ''
  local dot = string.find(s, '.', 1, true)
  if dot then
    ip = string.sub(s, 1, dot - 1)
    fp = string.sub(s, dot + 1)
  end
  if ip == '' then ip = '0' end
  if not string.find(ip, '^%d+$') or (fp ~= '' and not string.find(fp, '^%d+$')) then
    error('ledger: not a decimal: ' .. tostring(s))
  end
  return neg, ip, fp
end

-- Both magnitudes as digit strings of one length (with one spare leading digit for a carry) and a scale.
local function dec_align(a, b)
  local na, ia, fa = dec_parse(a)
  local nb, ib, fb = dec_parse(b)
  local scale = math.max(#fa, #fb)
  fa = fa .. string.rep('0', scale - #fa)
  fb = fb .. string.rep('0', scale - #fb)
  local width = math.max(#ia, #ib) + 1
  ia = string.rep('0', width - #ia) .. ia
  ib = string.rep('0', width - #ib) .. ib
  return na, ia .. fa, nb, ib .. fb, scale
end

-- -1, 0, 1 for equal-length digit strings (bytewise, independent of the server's collation locale).
local function mag_cmp(a, b)
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      if x < y then return -1 end
      return 1
    end
  end
  return 0
end

local function mag_add(a, b)
  local out, carry = {}, 0
  for i = #a, 1, -1 do
    local d = string.byte(a, i) + string.byte(b, i) - 96 + carry
    if d >= 10 then d, carry = d - 10, 1 else carry = 0 end
    out[i] = string.char(48 + d)
  end
  return table.concat(out, '', 1, #a)
end

-- a - b for equal-length digit strings with a >= b.
local function mag_sub(a, b)
  local out, borrow = {}, 0
  for i = #a, 1, -1 do
    local d = string.byte(a, i) - string.byte(b, i) - borrow
    if d < 0 then d, borrow = d + 10, 1 else borrow = 0 end
    out[i] = string.char(48 + d)
  end
  return table.concat(out, '', 1, #a)
end

local function dec_format(neg, digits, scale)
  local ip = string.sub(digits, 1, #digits - scale)
  local fp = string.sub(digits, #digits - scale + 1)
  ip = string.gsub(ip, '^0+', '')
  fp = string.gsub(fp, '0+$', '')
  if ip == '' then ip = '0' end
  if ip == '0' and fp == '' then return '0' end
  local s = ip
  if fp ~= '' then s = s .. '.' .. fp end
  if neg then s = '-' .. s end
  return s
end

local function dec_add(a, b)
  local na, da, nb, db, scale = dec_align(a, b)
  if na == nb then return dec_format(na, mag_add(da, db), scale) end
  if mag_cmp(da, db) >= 0 then return dec_format(na, mag_sub(da, db), scale) end
  return dec_format(nb, mag_sub(db, da), scale)
end

local function dec_neg(a)
  if string.byte(a, 1) == 45 then return string.sub(a, 2) end
  if a == '0' then return a end
  return '-' .. a
end

local function dec_sub(a, b)
  return dec_add(a, dec_neg(b))
end

local function dec_cmp(a, b)
  local d = dec_sub(a, b)
  if d == '0' then return 0 end
  if string.byte(d, 1) == 45 then return -1 end
  return 1
end

-- The server's clock in milliseconds, so that instances with skewed clocks agree on what has expired.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Fencing: a write carrying a token older than the highest one seen is refused; a newer one becomes the
-- highest. Returns nil when the write may go on, else the highest token (the caller returns it).
local function fence_check(fence_key, token)
  if token == '' then return nil end
  local highest = redis.call('GET', fence_key)
  if highest and dec_cmp(token, highest) < 0 then return highest end
  if not highest or dec_cmp(token, highest) > 0 then redis.call('SET', fence_key, token) end
  return nil
end

-- A lock record: "asset\namount\nexpires_ms".
local function lock_parse(record)
  local asset, amount, expires = string.match(record, '^([^\n]*)\n([^\n]*)\n([^\n]*)$')
  return asset, amount, tonumber(expires)
end

-- Holdings of `asset` minus its live locks; expired locks are dropped when `purge` is set.
local function available(hold_key, locks_key, asset, now, purge)
  local total = redis.call('HGET', hold_key, asset) or '0'
  local flat = redis.call('HGETALL', locks_key)
  for i = 1, #flat, 2 do
    local a, amount, expires = lock_parse(flat[i + 1])
    if expires <= now then
      if purge then redis.call('HDEL', locks_key, flat[i]) end
    elseif a == asset then
      total = dec_sub(total, amount)
    end
  end
  return total
end
