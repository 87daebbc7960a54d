#!/usr/bin/env bash
# Per-layer smoothness estimates over training (RESULTS.md section 3, question 4, and issue 26):
# the second edition's five Muon runs (benchmarks/run_study.sh part 6: one seed, lr 0.05, every
# layer active at every step, estimates logged at each evaluation) with today's estimator, into
# benchmarks/results/smoothness/<variant>/<setting>/:
#   modules  per-module layers, estimates refreshed every step (the "after" of the one-scale fix;
#            the "before" is benchmarks/results/study/smoothness/, written by the old estimator)
#   every10  the same runs refreshing each estimate every 10th step (--smoothness-every 10)
#   blocks   depth units (--layers blocks) on the models that have blocks
# Muon's training does not depend on the estimates, so the variants train identically and differ
# only in what they estimate. About 15 minutes on the 2-core machine; --resume keeps finished
# runs. Tables: python3 benchmarks/smoothness_tables.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/smoothness
common=(--no-progress --threads 2 --resume --seeds 0 --optimizers muon --lr 0.05 --log-smoothness)

run() { # variant, setting, then arguments
    local variant=$1 setting=$2
    shift 2
    local start=$SECONDS
    mkdir -p "$out/$variant"
    python3 -m dropmuon.compare "${common[@]}" --output "$out/$variant/$setting" "$@" \
        >"$out/$variant/$setting.log" 2>&1 || { tail -20 "$out/$variant/$setting.log"; exit 1; }
    echo "$variant/$setting: $((SECONDS - start)) s" | tee -a "$out/times.txt"
}

settings() { # variant, then extra arguments
    local variant=$1
    shift
    [[ $variant == blocks ]] || run "$variant" fashion-mnist-paper-cnn --dataset fashion-mnist \
        --model paper-cnn --batch-size 256 --train-size 20480 --epochs 1 --max-steps 80 \
        --test-size 1000 --eval-train-size 500 --eval-every-steps 10 "$@"
    run "$variant" fortunes-gpt --dataset fortunes --model gpt --batch-size 128 --epochs 1 \
        --max-steps 300 --test-size 400 --eval-train-size 400 --eval-every-steps 30 \
        --loss-targets 2.3 "$@"
    run "$variant" fashion-mnist-vit --dataset fashion-mnist --model vit --batch-size 256 \
        --train-size 20480 --epochs 1 --max-steps 80 --test-size 1000 --eval-train-size 500 \
        --eval-every-steps 20 "$@"
    run "$variant" fashion-mnist-resnet18 --dataset fashion-mnist --model resnet18 --width 16 \
        --batch-size 256 --train-size 20480 --epochs 1 --max-steps 80 --test-size 1000 \
        --eval-train-size 500 --eval-every-steps 20 "$@"
    [[ $variant == blocks ]] || run "$variant" mnist-paper-cnn --dataset mnist --model paper-cnn \
        --batch-size 256 --epochs 2 --max-steps 54 --test-size 1000 --eval-train-size 500 \
        --eval-every-steps 6 "$@"
}

settings modules --smoothness-every 1
settings every10 --smoothness-every 10
settings blocks --layers blocks --smoothness-every 1
echo "smoothness done: $out"
