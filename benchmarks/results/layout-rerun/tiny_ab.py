"""optimizer.step() of a 40-layer 8x8 MLP, sampling full: the Python orchestration alone."""

import statistics
import sys
import time

import torch
from torch import nn

import dropmuon

torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(40)])
model(torch.randn(4, 8)).sum().backward()
grads = {p: p.grad.clone() for p in model.parameters()}
opt = dropmuon.DropMuon(model, lr=0.01, sampling="full", fallback="adamw")
times = []
for _ in range(400):
    for p, g in grads.items():
        p.grad = g
    t = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t)
print(sys.argv[1], f"tiny40={statistics.median(times[50:]) * 1e3:.3f}")
