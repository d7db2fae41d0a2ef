-- wrk script: batches of 100 publishes of 1 KiB each to agent:bench (messages/s = requests/s × 100).
-- wrk -t2 -c16 -d10s -s benches/batch.lua http://127.0.0.1:7070
wrk.method = "POST"
wrk.path = "/v1/messages/batch"
wrk.headers["Content-Type"] = "application/json"
local one = '{"to":"agent:bench","from":"wrk","body":{"pad":"' .. string.rep("x", 980) .. '"}}'
local list = {}
for i = 1, 100 do list[i] = one end
wrk.body = '{"messages":[' .. table.concat(list, ",") .. ']}'

local errors = 0
response = function(status, headers, body)
  if status ~= 201 then errors = errors + 1 end
end

done = function(summary, latency, requests)
  io.write(string.format("non-201 responses: %d\n", errors))
end
