-- The coupon's state, read together.
--
-- KEYS[1] gate, KEYS[2] holders, KEYS[3] pending (as in admit.lua)
--
-- Answers nil without a gate, else {total, taken, starts_ms, ends_ms,
-- {user, holder value, ...}, {user, admission ms, ...}}.

local g = redis.call('HMGET', KEYS[1], 'total', 'taken', 'starts_ms', 'ends_ms')
if not g[1] then
  return false
end
return {g[1], g[2], g[3], g[4], redis.call('HGETALL', KEYS[2]),
  redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')}
