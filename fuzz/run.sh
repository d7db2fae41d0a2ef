#!/usr/bin/env bash
# T11: runs every fuzz target for a bounded time with cargo-fuzz (libFuzzer, nightly), then
# minimizes each corpus. Usage: fuzz/run.sh [seconds per target, default 60] [target...]
# Findings land in fuzz/artifacts/<target>/; copy a reproducer into fuzz/corpus/<target>/
# once fixed, so that CI replays it (tests/integration/fuzz_corpus.rs, stable).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(record_decode segment_scan publish_validation config_parse)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
(cd fuzz && cargo run --quiet --bin seeds)
for target in "${targets[@]}"; do
  echo "== $target: ${secs}s"
  cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -print_final_stats=1 \
    2>&1 | tee "fuzz/target/$target.log" | grep -E "^(stat::|==|SUMMARY|INFO: seed)|Done [0-9]+ runs" || true
  cargo +nightly fuzz cmin "$target" >/dev/null 2>&1
  echo "$target: $(ls "fuzz/corpus/$target" | wc -l) inputs in the minimized corpus"
done
