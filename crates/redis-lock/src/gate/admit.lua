-- The coupon gate's admission of one request, atomically, on the coupon's slot.
--
-- KEYS[1] gate     hash: total, taken, starts_ms, ends_ms (-1: never closes)
-- KEYS[2] holders  hash: user -> 'I|key' (issued) or 'P|key|token' (pending)
-- KEYS[3] pending  zset: user by admission ms
-- KEYS[4] record   hash: fp, status, body, expires_ms (a refusal recorded under the key)
--
-- ARGV[1] user       ARGV[2] key         ARGV[3] fingerprint   ARGV[4] token
-- ARGV[5] now_ms     ARGV[6] expires_ms  ARGV[7] record_ttl_ms (<= 0: record nothing)
-- ARGV[8] stale_before_ms (a unit pending since before this is stale)
-- ARGV[9],  ARGV[10] status and body of SOLD_OUT
-- ARGV[11], ARGV[12] status and body of ALREADY_ISSUED
-- ARGV[13], ARGV[14] status and body of NOT_OPEN
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

local function refuse(status, body, kind, stale)
  if tonumber(ARGV[7]) > 0 then
    redis.call('HSET', record, 'fp', fingerprint, 'status', status, 'body', body,
      'expires_ms', ARGV[6])
    redis.call('PEXPIRE', record, ARGV[7])
  end
  return {'refused', kind, stale}
end

local held = redis.call('HGET', holders, user)
if held then
  -- Pending (under any key), or issued under this very key: the database answers.
  if string.sub(held, 1, 2) ~= 'I|' or string.sub(held, 3) == key then
    return {'pass'}
  end
  return refuse(ARGV[11], ARGV[12], 'already_issued', 0)
end

local starts, ends = tonumber(g[3]), tonumber(g[4])
if now < starts or (ends >= 0 and now >= ends) then
  return refuse(ARGV[13], ARGV[14], 'not_open', 0)
end

if tonumber(g[2]) >= tonumber(g[1]) then
  local stale = 0
  if #redis.call('ZRANGEBYSCORE', pending, '-inf', '(' .. ARGV[8], 'LIMIT', 0, 1) > 0 then
    stale = 1
  end
  return refuse(ARGV[9], ARGV[10], 'sold_out', stale)
end

redis.call('HINCRBY', gate, 'taken', 1)
redis.call('HSET', holders, user, 'P|' .. key .. '|' .. token)
redis.call('ZADD', pending, ARGV[5], user)
return {'admitted'}
