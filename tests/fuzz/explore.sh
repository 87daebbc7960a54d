#!/usr/bin/env bash
# The open-ended fuzzer: mutates for FUZZ_SECONDS (default 600) with a random seed, keeping what
# it finds in build/fuzz/corpus between runs. Not part of the test command (its inputs differ
# every run). When it finds a crash (build/fuzz/artifacts/crash-*), fix the code, then add the
# input to make_corpus.py's REGRESSIONS list (base64, with a line on what it broke) so that every run
# of tests/fuzz/run.sh replays it from then on.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/fuzz/build.sh

seconds="${FUZZ_SECONDS:-600}"
mkdir -p "$out/corpus"
log="$out/explore.log"
status=0
"$out/fuzz_c_api" "$out/corpus" "$out/seeds" -max_total_time="$seconds" -timeout=20 \
    -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 \
    -artifact_prefix="$out/artifacts/" >"$log" 2>&1 || status=$?
report "$status" "$log" "${seconds} s"
