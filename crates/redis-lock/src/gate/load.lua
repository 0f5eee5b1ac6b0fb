-- Replaces the coupon's state with the database's snapshot, atomically.
--
-- KEYS[1] gate, KEYS[2] holders, KEYS[3] pending (as in admit.lua)
-- ARGV[1] total, ARGV[2] starts_ms, ARGV[3] ends_ms (-1: never closes)
-- ARGV[4] stale_before_ms: units pending since then (or later) are kept
-- ARGV[5], ARGV[6], ...: the snapshot's holders, as user, key pairs
--
-- Holders: the snapshot's, issued; plus the users the gate already holds as issued that the
-- snapshot lacks (an issued holder is only ever written after its commit, so it is true;
-- the snapshot was read before that commit, or the loads of two rebuilds crossed); plus
-- the fresh pending units of users held by neither (their steps may still commit), with
-- their token and admission time.
-- taken: the number of holders. Recorded refusals are not touched. Answers taken.

local gate, holders, pending = KEYS[1], KEYS[2], KEYS[3]

-- The fresh pending units, before the state is dropped.
local fresh = redis.call('ZRANGEBYSCORE', pending, ARGV[4], '+inf', 'WITHSCORES')
local kept = {}
for i = 1, #fresh, 2 do
  local held = redis.call('HGET', holders, fresh[i])
  if held and string.sub(held, 1, 2) == 'P|' then
    kept[#kept + 1] = {fresh[i], fresh[i + 1], held}
  end
end

-- The issued holders, before the state is dropped.
local confirmed = {}
local all = redis.call('HGETALL', holders)
for i = 1, #all, 2 do
  if string.sub(all[i + 1], 1, 2) == 'I|' then
    confirmed[#confirmed + 1] = {all[i], all[i + 1]}
  end
end

redis.call('DEL', gate, holders, pending)

-- In batches: a snapshot may hold 100k users, far more than one call takes.
local batch = {}
for i = 5, #ARGV - 1, 2 do
  batch[#batch + 1] = ARGV[i]
  batch[#batch + 1] = 'I|' .. ARGV[i + 1]
  if #batch >= 1000 then
    redis.call('HSET', holders, unpack(batch))
    batch = {}
  end
end
if #batch > 0 then
  redis.call('HSET', holders, unpack(batch))
end

for _, holder in ipairs(confirmed) do
  redis.call('HSETNX', holders, holder[1], holder[2])
end

for _, unit in ipairs(kept) do
  if redis.call('HSETNX', holders, unit[1], unit[3]) == 1 then
    redis.call('ZADD', pending, unit[2], unit[1])
  end
end

local taken = redis.call('HLEN', holders)
redis.call('HSET', gate, 'total', ARGV[1], 'taken', taken, 'starts_ms', ARGV[2],
  'ends_ms', ARGV[3])
return taken
