-- wrk script: each connection waits THINK_MS (default 20) between its requests, so the
-- offered load is bounded (about connections / (THINK_MS + latency)) instead of saturating.
local think = tonumber(os.getenv("THINK_MS") or "20")

function delay()
   return think
end
