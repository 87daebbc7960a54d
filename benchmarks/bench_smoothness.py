"""What the smoothness estimator adds to an optimizer step (issue 26, item 3), on the paper CNN,
ResNet-18 (width 16), the ViT and the char GPT of the study: Muon's ``step()`` without
estimates, with the estimator before the one-scale fix (every parameter, every step; loaded
from git at ``--before``), and with today's refreshing every step and every 10th. The same
model, gradients and harness configuration for each (Muon lr 0.05, AdamW lr 1e-3, momentum
0.95; every layer active), timed round-robin in blocks of 10 steps (one period of the sparse
refresh), the median of ``2 * repeats`` blocks' mean step; the forward and
backward of the study's batch are timed once per model to put the step in proportion.

    python benchmarks/bench_smoothness.py [--repeats 5] [--before 9f71590] [--output table.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from dropmuon import Muon
from dropmuon.compare.models import build_language_model, build_model
from dropmuon.layers import book

BLOCK = 10
MODELS = {  # name: (model, batch, loss)
    "paper CNN": (
        lambda: build_model("paper-cnn", 1, 10, 28),
        lambda: (torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))),
        nn.functional.cross_entropy,
    ),
    "ResNet-18 (width 16)": (
        lambda: build_model("resnet18", 1, 10, 28, width=16),
        lambda: (torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))),
        nn.functional.cross_entropy,
    ),
    "ViT": (
        lambda: build_model("vit", 1, 10, 28),
        lambda: (torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))),
        nn.functional.cross_entropy,
    ),
    "char GPT": (
        lambda: build_language_model("gpt", 80, 64),
        lambda: (torch.randint(0, 80, (128, 64)), torch.randint(0, 80, (128, 64))),
        lambda logits, y: nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()),
    ),
}


def old_estimator(commit: str):
    """The estimator class of ``commit`` (before the one-scale fix), with today's calls."""
    source = subprocess.run(
        ["git", "show", f"{commit}:python/dropmuon/layers/smoothness.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_smoothness.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("dropmuon.layers.old_smoothness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)

    class Before(module.SmoothnessEstimator):
        def __init__(self, num_layers, beta, cuda_kernels=None, every=1):
            super().__init__(num_layers, beta, cuda_kernels)
            self.every = every

        def for_sampling(self, has_matrices):
            return None  # timed with every layer active: no draw needs it

        def before_step(self, by_layer, state, update_counts, embeddings):
            return super().before_step(by_layer, state)

        def after_step(self, by_layer, state, before, embeddings):
            super().after_step(by_layer, state, before)

    return Before


def prepared_step(make, batch, loss_fn, estimator, **options):
    """``step()`` of Muon with fixed gradients, and the estimator class it uses."""
    torch.manual_seed(0)
    model = make()
    saved = book.SmoothnessEstimator
    book.SmoothnessEstimator = estimator
    try:
        opt = Muon(model, lr=0.05, momentum=0.95, fallback="adamw", adamw_lr=1e-3, **options)
    finally:
        book.SmoothnessEstimator = saved
    x, y = batch
    loss_fn(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]

    def step():
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        opt.step()

    for _ in range(2):  # warm-up; the estimator armed
        step()
    return step


def forward_backward_ms(make, batch, loss_fn, repeats: int) -> float:
    torch.manual_seed(0)
    model = make()
    x, y = batch
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model.zero_grad()
        loss_fn(model(x), y).backward()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", default="9f71590", help="commit of the old estimator")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    before = old_estimator(args.before)
    contenders = {
        "no estimates": (book.SmoothnessEstimator, dict(estimate_smoothness=False)),
        f"before ({args.before})": (before, dict(estimate_smoothness=True)),
        "after, every step": (book.SmoothnessEstimator, dict(estimate_smoothness=True)),
        "after, every 10th": (
            book.SmoothnessEstimator, dict(estimate_smoothness=True, smoothness_every=10)
        ),
    }  # fmt: skip
    names = list(contenders)
    lines = [
        f"# Smoothness estimator cost per optimizer step (torch {torch.__version__}, 2 threads; "
        f"median of {2 * args.repeats} blocks of {BLOCK} steps, each block's mean, round-robin)",
        "",
        "| model | forward+backward ms | "
        + " | ".join(f"{n} ms" for n in names)
        + " | estimator share of a training step: before / every step / every 10th |",
        "|---" * (len(names) + 3) + "|",
    ]
    for model_name, (make, batch_fn, loss_fn) in MODELS.items():
        batch = batch_fn()
        steps = [prepared_step(make, batch, loss_fn, est, **o) for est, o in contenders.values()]
        times = [[] for _ in steps]
        for _ in range(2 * args.repeats):
            for i, step in enumerate(steps):
                t0 = time.perf_counter()
                for _ in range(BLOCK):  # a whole period of the sparse refresh
                    step()
                times[i].append((time.perf_counter() - t0) / BLOCK)
        ms = [1e3 * statistics.median(t) for t in times]
        fb = forward_backward_ms(make, batch, loss_fn, args.repeats)
        shares = [(m - ms[0]) / (fb + m) for m in ms[1:]]
        lines.append(
            f"| {model_name} | {fb:.1f} | " + " | ".join(f"{m:.1f}" for m in ms) + " | "
            + " / ".join(f"{100 * s:.0f}%" for s in shares) + " |"
        )  # fmt: skip
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
