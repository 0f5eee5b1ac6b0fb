-- The coupon gate's admission of one request, atomically, on the coupon's slot.
--
-- KEYS[1] gate     hash: total, taken, starts_ms, ends_ms (-1: never closes)
-- KEYS[2] holders  hash: user -> 'I|key' (issued) or 'P|key|token' (pending)
-- KEYS[3] pending  zset: user by admission ms
-- KEYS[4] record   hash: fp, status, body, expires_ms (an answer recorded under the key by
--                  record.lua, once the database holds it; this script records nothing)
--
-- ARGV[1] user       ARGV[2] key         ARGV[3] fingerprint   ARGV[4] token
-- ARGV[5] now_ms     ARGV[6] stale_before_ms (a unit pending since before this is stale)
--
-- Answers {'missing'} | {'replay', status, body, expires_ms} | {'reused'} | {'pass'}
--       | {'refused', kind, stale (0 or 1)} | {'admitted'}.

local gate, holders, pending, record = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local user, key, fingerprint, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = tonumber(ARGV[5])

local g = redis.call('HMGET', gate, 'total', 'taken', 'starts_ms', 'ends_ms')
if not g[1] then
  return {'missing'}
end

-- A refusal recorded under this key: replayed for the same request, until its expiry.
local r = redis.call('HMGET', record, 'fp', 'status', 'body', 'expires_ms')
if r[1] then
  if tonumber(r[4]) > now then
    if r[1] == fingerprint then
      return {'replay', r[2], r[3], r[4]}
    end
    return {'reused'}
  end
  redis.call('DEL', record)
end

local function refuse(kind, stale)
  return {'refused', kind, stale}
end

local held = redis.call('HGET', holders, user)
if held then
  -- Pending (under any key), or issued under this very key: the database answers.
  if string.sub(held, 1, 2) ~= 'I|' or string.sub(held, 3) == key then
    return {'pass'}
  end
  return refuse('already_issued', 0)
end

local starts, ends = tonumber(g[3]), tonumber(g[4])
if now < starts or (ends >= 0 and now >= ends) then
  return refuse('not_open', 0)
end

if tonumber(g[2]) >= tonumber(g[1]) then
  local stale = 0
  if #redis.call('ZRANGEBYSCORE', pending, '-inf', '(' .. ARGV[6], 'LIMIT', 0, 1) > 0 then
    stale = 1
  end
  return refuse('sold_out', stale)
end

redis.call('HINCRBY', gate, 'taken', 1)
redis.call('HSET', holders, user, 'P|' .. key .. '|' .. token)
redis.call('ZADD', pending, ARGV[5], user)
return {'admitted'}
