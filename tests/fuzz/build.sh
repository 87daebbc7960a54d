# Sourced by run.sh and explore.sh: builds the fuzzer and its seeds, defines report().
out=build/fuzz
mkdir -p "$out/artifacts"
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

report() {  # status, log, what ran
    local runs coverage
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$2" | grep -o '[0-9]*$' || true)
    coverage=$(grep -o 'cov: [0-9]*' "$2" | tail -n 1 || true)
    if [ "$1" -ne 0 ]; then
        tail -n 60 "$2"
        echo "fuzz: FAILED (exit $1) after ${runs:-?} executions; inputs in $out/artifacts/"
        exit 1
    fi
    echo "fuzz ($3): ${runs} executions, ${coverage}, no crash, sanitizer report or broken check"
}
