-- wrk script: POST signed Shoptet webhooks, cycling through precomputed bodies.
-- usage: wrk ... -s bench/sign.lua URL -- BODIES_FILE [PAUSE_MS]
-- BODIES_FILE: one "signature<TAB>body" per line (HMAC-SHA1 hex of the body, precomputed).
-- PAUSE_MS: each connection waits a random time, PAUSE_MS on average (exponentially
-- distributed, as between the webhooks of independent senders), before its next request: a
-- paced load of about C * 1000 / PAUSE_MS per second with C connections. A fixed pause would
-- keep connections answered by one group commit in step, arriving in bursts. Without
-- PAUSE_MS, no pause at all.
local bodies = {}
local sigs = {}
local i = 0

function init(args)
  for line in io.lines(args[1]) do
    local tab = string.find(line, "\t", 1, true)
    sigs[#sigs + 1] = string.sub(line, 1, tab - 1)
    bodies[#bodies + 1] = string.sub(line, tab + 1)
  end
  if args[2] then
    local mean = tonumber(args[2])
    math.randomseed(os.time())
    -- Defined only when pacing: wrk checks for delay() after init().
    function delay() return -mean * math.log(1 - math.random()) end
  end
end

function request()
  i = i % #bodies + 1
  return wrk.format("POST", "/webhooks/shoptet", {
    ["Content-Type"] = "application/json",
    ["Shoptet-Webhook-Signature"] = sigs[i],
  }, bodies[i])
end

function done(summary, latency, requests)
  local ps = {}
  for p = 0.5, 99.5, 0.5 do ps[#ps + 1] = string.format("%.0f", latency:percentile(p)) end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"non2xx":%d,"connect_err":%d,"read_err":%d,' ..
    '"write_err":%d,"timeout_err":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"mean_us":%.1f,"quantiles_us":[%s]}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, table.concat(ps, ",")))
end
