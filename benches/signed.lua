-- wrk script: signed single publishes (auth.signing = true) of the 1 KiB body of publish.lua.
-- Each request carries the next line of $SIGNATURES (Courier-Signature values over that body,
-- one nonce each; benches/sign.py writes them) and $COURIER_TOKEN (agent wrk's) as its token.
--   python3 benches/sign.py "$TOKEN" 600000 > /tmp/signatures
--   COURIER_TOKEN=$TOKEN SIGNATURES=/tmp/signatures wrk -t2 -c64 -d10s -s benches/signed.lua URL
-- The unsigned baseline for the same client work (a request built per call, with the same
-- header sent under a name the server ignores): add SIGNATURE_HEADER=X-Unsigned and run it
-- against a server with auth.signing off. On a small machine wrk shares the cores, and a
-- request built per call costs wrk about twice the CPU of a fixed one.
wrk.method = "POST"
wrk.path = "/v1/messages"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("COURIER_TOKEN")
wrk.body = '{"to":"agent:bench","from":"wrk","body":{"pad":"' .. string.rep("x", 980) .. '"}}'

local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

local mine, at = {}, 0
function init(args)
  local threads = tonumber(os.getenv("THREADS") or "2")
  local n = 0
  for line in io.lines(os.getenv("SIGNATURES")) do
    if n % threads == id then mine[#mine + 1] = line end
    n = n + 1
  end
end

local header = os.getenv("SIGNATURE_HEADER") or "Courier-Signature"

function request()
  at = at + 1
  wrk.headers[header] = mine[at] or "out-of-signatures"
  return wrk.format()
end

local errors = 0
response = function(status, headers, body)
  if status ~= 201 then errors = errors + 1 end
end

done = function(summary, latency, requests)
  io.write(string.format("non-201 responses: %d\n", errors))
end
