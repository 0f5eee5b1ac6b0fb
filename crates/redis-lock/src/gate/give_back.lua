-- Frees the unit pending for the user, only if it is pending under the token ARGV[2].
--
-- KEYS[1] gate, KEYS[2] holders, KEYS[3] pending (as in admit.lua)
-- ARGV[1] user, ARGV[2] token (never contains '|')
--
-- Answers 1 when the unit was freed, 0 when it was left alone.

local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held or string.sub(held, 1, 2) ~= 'P|' then
  return 0
end
local suffix = '|' .. ARGV[2]
if #held < #suffix + 2 or string.sub(held, -#suffix) ~= suffix then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'taken', -1)
end
return 1
