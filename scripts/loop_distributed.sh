#!/usr/bin/env bash
# Runs the multi-process tests (DDP, FSDP2 and the FSDP2 example) N times in a row, in the order
# the full suite runs them, and counts the runs that failed: the check that the test command
# does not flake there. Logs of failed runs stay in build/loop-distributed/.
#
#     bash scripts/loop_distributed.sh [N=30]
set -uo pipefail
cd "$(dirname "$0")/.."
runs="${1:-30}"
out=build/loop-distributed
mkdir -p "$out"
failed=0
start=$SECONDS
for i in $(seq 1 "$runs"); do
    if python3 -m pytest tests/python/test_distributed.py tests/python/test_fsdp.py -q \
        -p no:cacheprovider >"$out/run$i.log" 2>&1; then
        echo "run $i: passed ($(tail -n 1 "$out/run$i.log"))"
        rm -f "$out/run$i.log"
    else
        failed=$((failed + 1))
        echo "run $i: FAILED, log in $out/run$i.log"
    fi
done
echo "$((runs - failed)) of $runs runs passed in $((SECONDS - start)) s"
[ "$failed" -eq 0 ]
