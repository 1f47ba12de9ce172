-- The lease holder announces its token. KEYS: fence. ARGV: token.
local highest = fence_check(KEYS[1], ARGV[1])
if highest then return {'fenced', highest} end
return {'ok', ''}
