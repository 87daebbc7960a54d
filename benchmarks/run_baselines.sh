#!/usr/bin/env bash
# The Muon implementations people run, against ours, on the study's Fashion-MNIST paper-CNN
# setting (benchmarks/RESULTS.md, "Against other Muon implementations"): each tuned on the
# validation split over the same lr grid (one sweep seed), then 5 paired final seeds. Resumable
# (--resume keeps every finished run). Needs the baselines: pip install "dropmuon[baselines]".
# About an hour on 2 CPU cores; keep the machine otherwise idle, the clock is wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/baselines
mkdir -p "$out"
start=$SECONDS
python3 -m dropmuon.compare --no-progress --threads 2 --resume --seeds 0 1 2 3 4 \
    --sweep-seeds 1 --optimizers muon torch-muon kj-muon po-muon po-adamuon po-normuon dropmuon \
    --dataset fashion-mnist --model paper-cnn \
    --batch-size 256 --train-size 20480 --epochs 1 --max-steps 80 \
    --val-size 2000 --test-size 1000 --eval-train-size 500 --eval-every-steps 10 \
    --lr-grid 0.01 0.02 0.05 0.1 --select-target 0.75 \
    --train-targets 0.70 0.75 0.80 --val-targets 0.70 0.75 0.80 --test-targets 0.70 0.75 0.80 \
    --output "$out/fashion-mnist-paper-cnn" "$@" >"$out/fashion-mnist-paper-cnn.log" 2>&1 ||
    { tail -20 "$out/fashion-mnist-paper-cnn.log"; exit 1; }
echo "fashion-mnist-paper-cnn: $((SECONDS - start)) s" | tee -a "$out/times.txt"
