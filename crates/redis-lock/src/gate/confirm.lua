-- The user was issued the coupon under ARGV[2]: held as issued, counted once.
--
-- KEYS[1] gate, KEYS[2] holders, KEYS[3] pending (as in admit.lua)
-- ARGV[1] user, ARGV[2] key
--
-- Answers 0 (already issued), 1 (a pending unit became issued), 2 (a unit the gate did
-- not hold, e.g. rebuilt meanwhile: counted now), 3 (no gate: only the issued holder is
-- written, which the load that rebuilds the gate keeps, whether or not its snapshot was
-- read before this unit's commit).

if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[2], ARGV[1], 'I|' .. ARGV[2])
  return 3
end
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held and string.sub(held, 1, 2) == 'I|' then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], 'I|' .. ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
if held then
  return 1
end
redis.call('HINCRBY', KEYS[1], 'taken', 1)
return 2
