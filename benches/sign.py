#!/usr/bin/env python3
"""Writes COUNT Courier-Signature values (one per line, each with its own nonce, the current
time) over the body of benches/signed.lua, keyed by TOKEN: the input of that wrk script."""
import hashlib, hmac, sys, time

token, count = sys.argv[1].encode(), int(sys.argv[2])
body = '{"to":"agent:bench","from":"wrk","body":{"pad":"' + "x" * 980 + '"}}'
t = int(time.time())
out = sys.stdout
for i in range(count):
    nonce = f"b{i:x}"
    mac = hmac.new(token, f"{t}.{nonce}.{body}".encode(), hashlib.sha256).hexdigest()
    out.write(f"t={t},n={nonce},s={mac}\n")
