#!/usr/bin/env bash
# Fuzzes the C API (csrc/include/dropmuon/dropmuon.h) for a bounded time: builds fuzz_c_api.c
# and the C core with clang's libFuzzer, AddressSanitizer and UndefinedBehaviorSanitizer (any
# report aborts), seeds it with make_corpus.py, runs it for FUZZ_SECONDS (default 60) and prints
# the number of executions. A crash, sanitizer report or broken contract check fails the script
# and leaves the input under build/fuzz/artifacts/ (replay: build/fuzz/fuzz_c_api <file>).
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds="${FUZZ_SECONDS:-60}"
out=build/fuzz
mkdir -p "$out/corpus" "$out/artifacts"
cc="${FUZZ_CC:-clang}"
command -v "$cc" >/dev/null || { echo "fuzz: $cc not found (scripts/setup.sh installs clang)"; exit 1; }

# The core's own flags (-ffp-contract=off) plus the instrumentation; -O1 keeps the sanitizers
# fast without hiding much. DMI_NO_CLONES: clang 14 does not resolve calls across files to the
# core's multi-versioned (target_clones) functions, so one generic version of each is built.
"$cc" -std=c11 -g -O1 -ffp-contract=off -fno-omit-frame-pointer -DDM_NO_CLONES \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -Wall -Wextra -Icsrc/include -Icsrc/core \
    csrc/core/*.c tests/fuzz/fuzz_c_api.c -lm -o "$out/fuzz_c_api"

rm -rf "$out/seeds"
python3 tests/fuzz/make_corpus.py "$out/seeds"

# New inputs go to $out/corpus (kept between local runs; CI starts empty). -timeout: one input
# taking 20 s counts as a hang. -rss_limit_mb: the harness caps its allocations far below.
log="$out/fuzz.log"
status=0
"$out/fuzz_c_api" "$out/corpus" "$out/seeds" -max_total_time="$seconds" -timeout=20 \
    -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 \
    -artifact_prefix="$out/artifacts/" >"$log" 2>&1 || status=$?
runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
coverage=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)
if [ "$status" -ne 0 ]; then
    tail -n 60 "$log"
    echo "fuzz: FAILED (exit $status) after ${runs:-?} executions; inputs in $out/artifacts/"
    exit 1
fi
echo "fuzz: ${runs} executions in ${seconds} s, ${coverage}, corpus $(ls "$out/corpus" | wc -l) inputs, no crash, sanitizer report or broken check"
