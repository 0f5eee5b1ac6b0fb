-- wrk script: POST /api/users/{id}/balance/charge, each request with its own idempotency key.
--
--   USERS=100   spread: request n of a thread goes to user (n % USERS) + 1 (default)
--   HOT_USER=1  every request on that user instead
--   AMOUNT=1    won per charge
--   RUN_ID=...  part of every key, so runs against one database never reuse a key
--
-- Counts every status in response() and prints, from done(), one line
-- `JSON {...}` with requests, throughput, latency percentiles (ms) and the statuses.
--
--   USERS=100 RUN_ID=x wrk -t1 -c32 -d15s --latency -s bench/wrk/charge.lua http://127.0.0.1:8080

local users = tonumber(os.getenv("USERS") or "") or 100
local hot = tonumber(os.getenv("HOT_USER") or "")
local amount = tonumber(os.getenv("AMOUNT") or "") or 1
local run_id = os.getenv("RUN_ID") or tostring(os.time())

-- Main state: the threads, so done() can collect their counts.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

-- Thread state (each thread has its own Lua state). Globals so thread:get can read them.
counter = 0
statuses = {}
local prefix = ""
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  prefix = "wrk-" .. run_id .. "-" .. tostring(tid) .. "-"
end

function request()
  counter = counter + 1
  local user = hot or ((counter % users) + 1)
  local body = '{"amount":' .. amount .. ',"idempotencyKey":"' .. prefix .. counter .. '"}'
  return wrk.format("POST", "/api/users/" .. user .. "/balance/charge", headers, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local by_status = {}
  local non200 = 0
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses") or {}) do
      by_status[status] = (by_status[status] or 0) + n
      if status ~= 200 then non200 = non200 + n end
    end
  end
  local parts = {}
  for status, n in pairs(by_status) do
    table.insert(parts, string.format('"%d":%d', status, n))
  end
  local e = summary.errors
  local secs = summary.duration / 1e6
  local ms = function(us) return us / 1000.0 end
  io.write(string.format(
    'JSON {"tool":"wrk","requests":%d,"duration_s":%.3f,"throughput_rps":%.1f,' ..
    '"latency_ms":{"avg":%.3f,"p50":%.3f,"p75":%.3f,"p90":%.3f,"p95":%.3f,"p99":%.3f,"max":%.3f},' ..
    '"non200":%d,"statuses":{%s},' ..
    '"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},"status_errors":%d}\n',
    summary.requests, secs, summary.requests / secs,
    ms(latency.mean), ms(latency:percentile(50)), ms(latency:percentile(75)),
    ms(latency:percentile(90)), ms(latency:percentile(95)), ms(latency:percentile(99)),
    ms(latency.max),
    non200, table.concat(parts, ","),
    e.connect, e.read, e.write, e.timeout, e.status))
end
