"""optimizer.step() cost of the installed dropmuon on the paper CNN (code-version agnostic)."""

import statistics
import sys
import time

import torch
from torch import nn

import dropmuon

torch.set_num_threads(2)


def cnn():
    layers, c = [], 1
    for out in (64, 128, 256):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(256 * 3 * 3, 10))


def bench(make, repeats=150):
    torch.manual_seed(0)
    model = cnn()
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    opt = make(model)
    times = []
    for r in range(repeats + 5):
        for p, g in grads.items():
            p.grad = g if p.requires_grad else None
        t = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t
        if r >= 5:
            times.append(dt)
    return statistics.median(times) * 1e3


rows = {
    "Muon bf16": lambda m: dropmuon.Muon(m, lr=0.05, fallback="adamw", ns_precision="bfloat16"),
    "Muon fp32": lambda m: dropmuon.Muon(m, lr=0.05, fallback="adamw", ns_precision="native"),
    "DropMuon uniform bf16 (step + post-hook)": lambda m: dropmuon.DropMuon(
        m, lr=0.05, fallback="adamw"
    ),
}
print(sys.argv[1], " ".join(f"{name}={bench(make):.3f}" for name, make in rows.items()), flush=True)
