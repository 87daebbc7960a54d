#!/usr/bin/env bash
# The main job (README's first command): Drop-Muon vs our Muon vs torch.optim.Muon on
# Fashion-MNIST with the paper's CNN, 3 seeds. Sized for 10-12 minutes on 2 CPU cores: batch
# 1024 on a fixed 10,240-image training subset for 3 epochs (the paper's batch 8192 costs ~17 s a
# step here), accuracy after each epoch on fixed subsets of 2,000 training and 4,000 test images
# (with 5,000 + 10,000 the evaluations took 40% of the job). Extra arguments are passed on
# (e.g. --seeds 0 or --output elsewhere). The full-size CPU runs are in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m dropmuon.compare \
    --dataset fashion-mnist --model paper-cnn \
    --optimizers dropmuon muon torch-muon --seeds 0 1 2 \
    --batch-size 1024 --train-size 10240 --epochs 3 --lr 0.05 --adamw-lr 1e-3 \
    --eval-train-size 2000 --test-size 4000 \
    --train-targets 0.75 0.80 0.85 --test-targets 0.75 0.80 0.85 \
    --output results/default "$@"
