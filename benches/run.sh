#!/usr/bin/env bash
# Runs the server benchmarks of issue 4 in one go, next to the reference points measured in
# the same run: axum's hello-world POST, the floor of a durable publish on the same stack
# (examples/floor.rs) and Redis Streams XADD with appendfsync always.
# Needs wrk and redis-server/redis-benchmark (Debian packages). Every step is bounded in time.
#   benches/run.sh            # about 2 minutes
#   DURATION=30s benches/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
PORT=${PORT:-7170}
URL=http://127.0.0.1:$PORT
cargo build --release --quiet --bin courier --example hello --example floor
cargo bench --quiet --bench load --no-run 2>/dev/null
LOAD=$(ls -t target/release/deps/load-* | grep -v '\.d$' | head -1)

DATA=$(mktemp -d /var/tmp/courier-bench.XXXXXX)
cleanup() { kill "${SERVER:-0}" "${HELLO:-0}" "${FLOOR:-0}" "${REDIS:-0}" 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT

start_server() {
  rm -rf "$DATA/data"
  target/release/courier --listen 127.0.0.1:$PORT --data-dir "$DATA/data" --fsync always \
    --limits-max-inbox-depth 100000000 >"$DATA/stdout" 2>"$DATA/stderr" &
  SERVER=$!
  until curl -sf $URL/readyz >/dev/null; do sleep 0.1; done
  curl -sf -X PUT $URL/v1/agents/bench -H 'content-type: application/json' -d '{}' >/dev/null
}
stop_server() { kill -TERM "$SERVER"; wait "$SERVER" || true; }

echo "== courier: single publishes, 1 KiB, 64 connections, fsync=always"
start_server
wrk -t2 -c64 -d"$DURATION" -s benches/publish.lua $URL
curl -s $URL/v1/stats | python3 -c 'import json,sys; l=json.load(sys.stdin)["log"]; print("records per fsync: %.1f" % (l["records_written"]/max(l["fsyncs"],1)))'
stop_server

echo "== courier: batches of 100 x 1 KiB, 16 connections, fsync=always (messages/s = requests/s x 100)"
start_server
wrk -t2 -c16 -d"$DURATION" -s benches/batch.lua $URL
stop_server

echo "== courier: receive + ack draining 200,000 messages, 8 consumers"
start_server
"$LOAD" fill $URL bench 200000 100 8
"$LOAD" drain $URL bench 200000 8
stop_server

echo "== courier: fan-out, 10,000 x 1 KiB to a topic with 100 subscribers, each drains its copies"
start_server
"$LOAD" fanout $URL bench.fanout 10000 100
stop_server

echo "== courier: a capability queue of 100,000 drained by 8 competing agents, against one inbox"
start_server
"$LOAD" fill $URL capability:work 100000 100 8
"$LOAD" qdrain $URL work 100000 8
stop_server
start_server
"$LOAD" fill $URL bench 100000 100 8
"$LOAD" drain $URL bench 100000 8
stop_server

echo "== courier: request -> worker -> reply round trips at 500 req/s for 10 s"
start_server
"$LOAD" request $URL answer 500 10 2
stop_server

for acks in pipelined sequential; do
  echo "== courier: publish -> delivery latency at a steady 1,000 msg/s for 10 s, $acks acks"
  start_server
  "$LOAD" latency $URL bench 1000 10 $acks
  stop_server
done

echo "== reference: axum hello-world POST, 1 KiB, 64 connections"
target/release/examples/hello 127.0.0.1:7180 >/dev/null &
HELLO=$!
sleep 0.5
wrk -t2 -c64 -d"$DURATION" -s benches/publish.lua http://127.0.0.1:7180
kill $HELLO

echo "== reference: the floor of a durable publish on this stack (examples/floor.rs: axum, JSON"
echo "   parse, group commit with one fdatasync per batch, nothing else), 1 KiB, 64 connections"
target/release/examples/floor 127.0.0.1:7181 "$DATA/floor.dat" >/dev/null &
FLOOR=$!
until curl -s -o /dev/null http://127.0.0.1:7181/; do sleep 0.2; done
wrk -t2 -c64 -d"$DURATION" -s benches/publish.lua http://127.0.0.1:7181
kill $FLOOR

echo "== reference: Redis Streams XADD 1 KiB, appendfsync always, 64 clients"
mkdir -p "$DATA/redis"
redis-server --port 7190 --dir "$DATA/redis" --appendonly yes --appendfsync always --save '' --daemonize no >/dev/null &
REDIS=$!
sleep 0.5
redis-benchmark -p 7190 -c 64 -n 200000 -q -d 1024 XADD bench '*' f __data__ 2>/dev/null | tail -1 || true
redis-benchmark -p 7190 -c 64 -n 200000 -q -P 16 XADD bench '*' f __data__ 2>/dev/null | tail -1 || true
kill $REDIS
