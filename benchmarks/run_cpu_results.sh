#!/usr/bin/env bash
# The CPU comparisons behind benchmarks/RESULTS.md (about 75 minutes on the 2-core machine).
# Each writes its folder under benchmarks/results/ (summary.md, runs.csv, runs/*.json, PNGs).
# Run on an otherwise idle machine: the times are wall-clock.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
common=(--no-progress --threads 2 --eval-train-size 5000)

# 1. Fashion-MNIST, paper CNN: the main job's setting, all three samplings side by side.
python3 -m dropmuon.compare "${common[@]}" --dataset fashion-mnist --model paper-cnn \
    --optimizers dropmuon dropmuon:epoch_shift dropmuon:cost_optimal muon torch-muon \
    --seeds 0 1 2 --batch-size 1024 --train-size 12288 --epochs 3 --lr 0.05 --adamw-lr 1e-3 \
    --train-targets 0.75 0.80 0.85 --test-targets 0.75 0.80 0.85 \
    --output "$out/fashion-mnist-paper-cnn"

# 2. MNIST (the shipped 10,000 digits: 8,000 train + 2,000 test), paper CNN.
python3 -m dropmuon.compare "${common[@]}" --dataset mnist --model paper-cnn \
    --optimizers dropmuon muon torch-muon --seeds 0 1 2 \
    --batch-size 1024 --epochs 6 --lr 0.05 --adamw-lr 1e-3 \
    --train-targets 0.90 0.95 0.97 --test-targets 0.90 0.95 0.97 \
    --output "$out/mnist-paper-cnn"

# 3. Fashion-MNIST, the residual CNN (ResNet-18 layout, width 16: 41 layers). lr 0.02: at the
#    paper CNN's 0.05 (kept in fashion-mnist-resnet18-lr0.05/, 3 epochs) every optimizer was
#    unstable in the first epochs.
python3 -m dropmuon.compare "${common[@]}" --dataset fashion-mnist --model resnet18 --width 16 \
    --optimizers dropmuon muon torch-muon --seeds 0 1 2 \
    --batch-size 512 --train-size 12288 --epochs 4 --lr 0.02 --adamw-lr 1e-3 \
    --train-targets 0.75 0.80 0.85 --test-targets 0.75 0.80 0.85 \
    --output "$out/fashion-mnist-resnet18"
