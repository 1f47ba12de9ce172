-- The ledger's epoch: written once when the portfolio's state is first created here, so that a ledger that
-- came back empty (a Redis restarted without persistence) is told apart from one that kept its state.
-- KEYS: epoch. ARGV: a fresh epoch to adopt when none exists. Returns {epoch, 'new' | 'kept'}.
local current = redis.call('GET', KEYS[1])
if current then return {current, 'kept'} end
redis.call('SET', KEYS[1], ARGV[1])
return {ARGV[1], 'new'}
