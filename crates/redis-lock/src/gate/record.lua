-- Records an answer the database step stored under a key, so that its replays come from
-- the gate too; a record already there (the gate's own, or an earlier copy) is kept.
--
-- KEYS[1] record   hash: fp, status, body, expires_ms
-- ARGV[1] fingerprint  ARGV[2] status  ARGV[3] body  ARGV[4] expires_ms  ARGV[5] ttl_ms
--
-- Answers 1 when it recorded, 0 when a record was there (or the answer has expired).

if tonumber(ARGV[5]) <= 0 or redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'status', ARGV[2], 'body', ARGV[3],
  'expires_ms', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
