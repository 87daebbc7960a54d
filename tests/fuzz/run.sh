#!/usr/bin/env bash
# The fuzzer as the test command runs it: a replay, the same inputs on every run, so a failure
# is always the change's, never the dice's. Builds fuzz_c_api.c and the C core with clang's
# libFuzzer, AddressSanitizer and UndefinedBehaviorSanitizer (any report aborts) and runs every
# input of the corpus once: make_corpus.py's seeds (every input that once broke a check among
# them) and corpus.b64 (merged from open-ended runs). The open-ended search that finds new inputs
# is tests/fuzz/explore.sh. A crash, sanitizer report or broken contract check fails the script
# and leaves the input under build/fuzz/artifacts/ (replay: build/fuzz/fuzz_c_api <file>).
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/fuzz/build.sh

log="$out/fuzz.log"
status=0
# -runs=0: each corpus input once, no mutation; the empty first directory keeps it that way.
rm -rf "$out/replay"
mkdir -p "$out/replay"
"$out/fuzz_c_api" "$out/replay" "$out/seeds" -runs=0 -seed=1 -timeout=20 -rss_limit_mb=2048 \
    -max_len=4096 -print_final_stats=1 -artifact_prefix="$out/artifacts/" >"$log" 2>&1 ||
    status=$?
report "$status" "$log" "replay of $(ls "$out/seeds" | wc -l) inputs"
