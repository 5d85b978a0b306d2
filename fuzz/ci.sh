#!/usr/bin/env bash
# Brief fuzzing for CI (see README.md): install cargo-fuzz if missing, build every target once
# (stable Rust, no sanitizer, debug assertions and overflow checks on), then run each target for
# FUZZ_SECS seconds (default 20). Any crash fails the step; its input is left in artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
secs=${FUZZ_SECS:-20}
cargo fuzz build -a --sanitizer none
for t in $(cargo fuzz list); do
    mkdir -p "corpus/$t"
    seeds=()
    if [ -d "seeds/$t" ]; then
        seeds=("seeds/$t")
    fi
    echo "fuzz: $t for ${secs}s"
    log="artifacts/$t.log"
    mkdir -p artifacts
    status=0
    cargo fuzz run -a --sanitizer none "$t" "corpus/$t" ${seeds[@]+"${seeds[@]}"} -- \
        -max_total_time="$secs" -max_len=16384 -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)' "$log" || true
    if [ "$status" -ne 0 ]; then
        grep -E -A20 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -60 >&2 || true
        echo "fuzz: $t failed (status $status); log in fuzz/$log, input in fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
