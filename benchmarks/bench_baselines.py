"""optimizer.step() per Muon implementation, on the paper CNN and the harness's ViT: the
Newton-Schulz time per step (every hidden matrix orthogonalized; the AdamW part is a few
elementwise passes). The same model, gradients and harness configuration for each
(``dropmuon.compare.train.build_optimizer``: Muon lr 0.05, AdamW lr 1e-3, momentum 0.95),
timed round-robin, median of ``4 * repeats`` steps.

    python benchmarks/bench_baselines.py [--repeats 5] [--output table.md]

Baselines whose package is missing are left out with a note (pip install "dropmuon[baselines]").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from dropmuon.compare.baselines import BASELINES, available
from dropmuon.compare.models import build_model
from dropmuon.compare.train import OptimizerSpec, build_optimizer

OURS = ["muon", "torch-muon"]
MODELS = {  # name: (model, input shape)
    "paper CNN": (lambda: build_model("paper-cnn", 1, 10, 28), (256, 1, 28, 28)),
    "ViT": (lambda: build_model("vit", 1, 10, 28), (256, 1, 28, 28)),
}


def steps_of(contenders: list[tuple[str, str]], make, shape) -> list:
    """One prepared ``step()`` per ``(optimizer, ns_precision)``: fixed gradients set, then the
    optimizer's step (bench_step.py times ours this way too)."""
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    steps = []
    for name, precision in contenders:
        args = argparse.Namespace(
            momentum=0.95, weight_decay=0.0, adamw_lr=1e-3, ns_precision=precision
        )
        torch.manual_seed(0)
        model = make()
        opt = build_optimizer(OptimizerSpec.parse(name), model, args, 0, 100, lr=0.05)
        nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]

        def step(model=model, opt=opt, grads=grads):
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            opt.step()

        step()  # warm-up (and the AdamW state)
        steps.append(step)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = OURS + [name for name in BASELINES if available(name)]
    missing = [name for name in BASELINES if not available(name)]
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; optimizer.step() in ms, "
        f"median of {4 * args.repeats} round-robin steps (`python benchmarks/bench_baselines.py "
        f"--repeats {args.repeats}`)",
        "",
        "| optimizer | " + " | ".join(f"{m} ms | vs torch-muon" for m in MODELS) + " |",
        "|---|" + "---|---|" * len(MODELS),
    ]
    columns = []
    for make, shape in MODELS.values():
        steps = steps_of([(name, "bfloat16") for name in names], make, shape)
        times = [[] for _ in steps]
        for _ in range(4 * args.repeats):
            for step, spent in zip(steps, times):
                start = time.perf_counter()
                step()
                spent.append(time.perf_counter() - start)
        medians = [statistics.median(t) * 1e3 for t in times]
        columns.append([(ms, ms / medians[names.index("torch-muon")]) for ms in medians])
    for i, name in enumerate(names):
        cells = " | ".join(f"{ms:.2f} | {ratio:.2f}" for ms, ratio in (c[i] for c in columns))
        lines.append(f"| {name} | {cells} |")
    if missing:
        lines.append("")
        lines.append("Not installed (left out): " + ", ".join(missing))
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
