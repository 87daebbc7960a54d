"""Which layers' infrequent updates cost the most progress per step (issue 27, question 4)?
Muon over depth units (``layers="blocks"``), and the same with one unit updated only on every
``--every``-th step (the others every step; truncation as in Drop-Muon: the backward stops at
the lowest active unit), from the same weights and batches, a few seeds. The gap in the final
validation metric against full Muon, per unit, is what skipping that unit costs per step.
Steps, not seconds: no timing, so it can share the machine.

    python3 benchmarks/layer_skip.py --lr 0.02 --steps 120 --output vit.md -- --dataset \\
        fashion-mnist --model vit --batch-size 256 --train-size 20480 --val-size 2000 \\
        --test-size 1000 --eval-train-size 500

(arguments after ``--`` are dropmuon-compare's, for the task and model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from dropmuon import DropMuon
from dropmuon.compare.cli import build_parser, build_task, check_args
from dropmuon.compare.data import batches
from dropmuon.compare.train import build_task_model


class SkipUnit:
    """Every unit active every step, except ``unit``: only on every ``every``-th step."""

    def __init__(self, unit: int | None, every: int) -> None:
        self.unit, self.every = unit, every

    def sample(self, step: int, num_layers: int) -> list[bool]:
        return [i != self.unit or step % self.every == 0 for i in range(num_layers)]


def harness_batches(task, batch_size: int, seed: int):
    """The batches dropmuon-compare trains ``seed`` on: a new shuffled order every epoch, for as
    many steps as asked (so runs longer than an epoch match the harness's too)."""
    shuffle = torch.Generator().manual_seed(seed)
    while True:
        yield from batches(task.num_train, batch_size, shuffle)


def train(task, task_args, seed: int, lr: float, steps: int, sampler) -> tuple[dict, list[str]]:
    torch.manual_seed(seed)
    model = build_task_model(task_args, task)
    opt = DropMuon(
        model, lr=lr, momentum=0.95, nesterov=True, fallback="adamw", adamw_lr=1e-3,
        sampling=sampler, layers="blocks",
    )  # fmt: skip
    for _, indices in zip(range(steps), harness_batches(task, task_args.batch_size, seed)):
        x, y = task.batch(indices)
        opt.zero_grad()
        task.loss(model, x, y).backward()
        opt.step()
    return task.evaluate(model), opt.layer_names()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, required=True, help="Muon's lr (the study's choice)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", required=True)
    parser.add_argument("harness", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    harness = build_parser()
    task_args = harness.parse_args([a for a in args.harness if a != "--"] + ["--output", "-"])
    check_args(harness, task_args)
    torch.set_num_threads(2)
    task = build_task(task_args)
    metric = "val_loss" if task.kind == "language-model" else "val_acc"

    full, names = {}, None
    for seed in args.seeds:
        full[seed], names = train(task, task_args, seed, args.lr, args.steps, SkipUnit(None, 1))
    lines = [
        f"# Skipping one depth unit (updated every {args.every}th step) vs Muon "
        f"(lr {args.lr:g}, {args.steps} steps, seeds {args.seeds})",
        "",
        f"`python3 benchmarks/layer_skip.py {' '.join(sys.argv[1:])}`",
        "",
        f"Muon: final {metric} {statistics.mean(full[s][metric] for s in args.seeds):.4f}",
        "",
        f"| unit | final {metric} | gap vs Muon (mean, min..max over seeds) |",
        "|---|---|---|",
    ]
    for unit, name in enumerate(names):
        gaps, values = [], []
        for seed in args.seeds:
            result, _ = train(
                task, task_args, seed, args.lr, args.steps, SkipUnit(unit, args.every)
            )
            values.append(result[metric])
            gaps.append(result[metric] - full[seed][metric])
        lines.append(
            f"| {name} | {statistics.mean(values):.4f} | {statistics.mean(gaps):+.4f} "
            f"({min(gaps):+.4f}..{max(gaps):+.4f}) |"
        )
        print(lines[-1], flush=True)
    Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
