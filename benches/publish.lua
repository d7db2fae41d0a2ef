-- wrk script: single publishes of a 1 KiB JSON body to agent:bench.
-- wrk -t2 -c64 -d10s -s benches/publish.lua http://127.0.0.1:7070
-- With auth.mode = token: COURIER_TOKEN=<the token of agent wrk> wrk ...
wrk.method = "POST"
wrk.path = "/v1/messages"
wrk.headers["Content-Type"] = "application/json"
local token = os.getenv("COURIER_TOKEN")
if token then wrk.headers["Authorization"] = "Bearer " .. token end
wrk.body = '{"to":"agent:bench","from":"wrk","body":{"pad":"' .. string.rep("x", 980) .. '"}}'

local errors = 0
response = function(status, headers, body)
  if status ~= 201 then errors = errors + 1 end
end

done = function(summary, latency, requests)
  io.write(string.format("non-201 responses: %d\n", errors))
end
