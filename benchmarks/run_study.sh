#!/usr/bin/env bash
# The study behind benchmarks/RESULTS.md section 3 (issue 15): does Drop-Muon beat a tuned Muon,
# where, and why. About 4 hours on the 2-core CPU machine, one setting after another; each
# writes benchmarks/results/study/<setting>/ (summary.md with its command, runs/, sweep/,
# runs.csv, sweep.csv, plots) and appends its wall time to benchmarks/results/study/times.txt.
# Interrupted, it resumes where it stopped (--resume keeps every finished run). Run it on an
# otherwise idle machine: the times are wall-clock.
#
# Within a setting every optimizer is tuned the same way: its lr from the same 3-value grid
# (AdamW: its own 3-value grid), chosen on a validation split held out of the training data;
# then 5 final seeds at the chosen lr, paired (same initial weights, same batches). The budget
# is a fixed number of optimizer steps per run (the same for every optimizer), evaluated every
# few steps (evaluation off the clock). Extra arguments go to every dropmuon-compare call.
#
# Settings 1-2 (run first): all six optimizers, grid 0.01/0.02/0.05, 2 sweep seeds per value.
# Both chose 0.05, the grid's top edge, for every Muon-family optimizer but one, so settings
# 3-5 move the grid up to 0.02/0.05/0.1; to fit the compute budget they use 1 sweep seed per
# value and leave out torch-muon (settings 1-2 show it matches muon step for step).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/study
mkdir -p "$out"
all_optimizers=(dropmuon dropmuon:epoch_shift dropmuon:cost_optimal muon torch-muon adamw)
common=(--no-progress --threads 2 --resume --seeds 0 1 2 3 4)
first=(--sweep-seeds 2 --optimizers "${all_optimizers[@]}")
first_grid=(0.01 0.02 0.05)
later=(--sweep-seeds 1 --optimizers dropmuon dropmuon:epoch_shift dropmuon:cost_optimal muon adamw)
later_grid=(0.02 0.05 0.1)

study() { # name, then dropmuon-compare arguments
    local name=$1
    shift
    local start=$SECONDS
    python3 -m dropmuon.compare "${common[@]}" --output "$out/$name" "$@" >"$out/$name.log" 2>&1 ||
        { tail -20 "$out/$name.log"; exit 1; }
    echo "$name: $((SECONDS - start)) s" | tee -a "$out/times.txt"
}

# 1. The paper's CNN on Fashion-MNIST (the paper's headline setting, CPU-sized).
study fashion-mnist-paper-cnn "${first[@]}" --dataset fashion-mnist --model paper-cnn \
    --batch-size 256 --train-size 20480 --epochs 1 --max-steps 80 \
    --val-size 2000 --test-size 1000 --eval-train-size 500 --eval-every-steps 10 \
    --lr-grid "${first_grid[@]}" adamw=3e-4,1e-3,3e-3 --select-target 0.75 \
    --train-targets 0.70 0.75 0.80 --val-targets 0.70 0.75 0.80 --test-targets 0.70 0.75 0.80 "$@"

# 2. A character-level GPT on Debian's fortunes (does it carry to transformers?).
study fortunes-gpt "${first[@]}" --dataset fortunes --model gpt --context 64 \
    --batch-size 128 --epochs 1 --max-steps 300 \
    --val-size 200 --test-size 400 --eval-train-size 400 --eval-every-steps 30 \
    --lr-grid "${first_grid[@]}" adamw=1e-3,3e-3,1e-2 --select-target 2.3 \
    --loss-targets 2.6 2.3 2.1 "$@"

# 3. A small ViT on Fashion-MNIST (80 steps: its results ran 80; the command once said 120, which
#    --epochs 1 capped silently and is now an error).
study fashion-mnist-vit "${later[@]}" --dataset fashion-mnist --model vit \
    --batch-size 256 --train-size 20480 --epochs 1 --max-steps 80 \
    --val-size 2000 --test-size 1000 --eval-train-size 500 --eval-every-steps 20 \
    --lr-grid "${later_grid[@]}" adamw=3e-4,1e-3,3e-3 --select-target 0.75 \
    --train-targets 0.65 0.70 0.75 --val-targets 0.65 0.70 0.75 --test-targets 0.65 0.70 0.75 "$@"

# 4. ResNet-18 layout (width 16, 41 layers) on Fashion-MNIST: replaces the shared-lr result.
study fashion-mnist-resnet18 "${later[@]}" --dataset fashion-mnist --model resnet18 --width 16 \
    --batch-size 256 --train-size 20480 --epochs 1 --max-steps 80 \
    --val-size 2000 --test-size 1000 --eval-train-size 500 --eval-every-steps 20 \
    --lr-grid "${later_grid[@]}" adamw=3e-4,1e-3,3e-3 --select-target 0.65 \
    --train-targets 0.50 0.65 0.75 --val-targets 0.50 0.65 0.75 --test-targets 0.50 0.65 0.75 "$@"

# 5. The paper's CNN on the shipped MNIST digits (8,000 train: 1,000 held out for validation).
study mnist-paper-cnn "${later[@]}" --dataset mnist --model paper-cnn \
    --batch-size 256 --epochs 2 --max-steps 54 \
    --val-size 1000 --test-size 1000 --eval-train-size 500 --eval-every-steps 6 \
    --lr-grid "${later_grid[@]}" adamw=3e-4,1e-3,3e-3 --select-target 0.90 \
    --train-targets 0.85 0.90 0.95 --val-targets 0.85 0.90 0.95 --test-targets 0.85 0.90 0.95 "$@"

# 6. Per-layer smoothness over training (question 4): Muon (every layer estimated at every
#    step), one seed at lr 0.05 (Muon's selected lr in settings 1-2), estimates logged at each
#    evaluation. Not a timed comparison: the estimator's own cost is on its clock.
smooth=(--no-progress --threads 2 --resume --seeds 0 --optimizers muon --lr 0.05 --log-smoothness)
smoothness() { # name, then arguments
    local name=$1
    shift
    local start=$SECONDS
    python3 -m dropmuon.compare "${smooth[@]}" --output "$out/smoothness/$name" "$@" \
        >"$out/smoothness-$name.log" 2>&1 || { tail -20 "$out/smoothness-$name.log"; exit 1; }
    echo "smoothness/$name: $((SECONDS - start)) s" | tee -a "$out/times.txt"
}
smoothness fashion-mnist-paper-cnn --dataset fashion-mnist --model paper-cnn --batch-size 256 \
    --train-size 20480 --epochs 1 --max-steps 80 --test-size 1000 --eval-train-size 500 \
    --eval-every-steps 10
smoothness fortunes-gpt --dataset fortunes --model gpt --batch-size 128 --epochs 1 \
    --max-steps 300 --test-size 400 --eval-train-size 400 --eval-every-steps 30 --loss-targets 2.3
smoothness fashion-mnist-vit --dataset fashion-mnist --model vit --batch-size 256 \
    --train-size 20480 --epochs 1 --max-steps 80 --test-size 1000 --eval-train-size 500 \
    --eval-every-steps 20
smoothness fashion-mnist-resnet18 --dataset fashion-mnist --model resnet18 --width 16 \
    --batch-size 256 --train-size 20480 --epochs 1 --max-steps 80 --test-size 1000 \
    --eval-train-size 500 --eval-every-steps 20
smoothness mnist-paper-cnn --dataset mnist --model paper-cnn --batch-size 256 --epochs 2 \
    --max-steps 54 --test-size 1000 --eval-train-size 500 --eval-every-steps 6
echo "study done: $out"
