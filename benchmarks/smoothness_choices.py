"""The evidence for letting vectors ride along in the smoothness estimates (docs/method.md
section 3): trains the study's ViT (or another harness model) with Muon, every layer active,
and at a few steps prints each layer's secant estimate (EMA-free, one step) measured

  - ``matrices``: the estimator's choice (each matrix in its RMS->RMS operator norm),
  - ``with vectors``: the same plus the layer's vectors in their own RMS->RMS norms (a gain as a
    diagonal operator, ||g||_inf, dual ||.||_1; a bias as a vector, RMS, dual sqrt(n) ||.||_2),
  - ``same batch``: ``with vectors`` on the gradient of the same batch before and after the
    step (no gradient noise in the difference),

    python benchmarks/smoothness_choices.py --steps 61 -- --dataset fashion-mnist --model vit \\
        --batch-size 256 --train-size 20480 --test-size 1000 --eval-train-size 500

(arguments after ``--`` are dropmuon-compare's, for the task and model).
"""

from __future__ import annotations

import argparse
import math

import torch

from dropmuon import Muon
from dropmuon.compare.cli import build_parser, build_task, check_args
from dropmuon.compare.data import batches
from dropmuon.compare.train import build_task_model
from dropmuon.layers.smoothness import measured, rms_dual_norm, rms_operator_norm


def vector_dual(name: str, g: torch.Tensor) -> float:
    if name.endswith("bias"):
        return math.sqrt(g.numel()) * float(g.double().norm())
    return float(g.double().abs().sum())


def vector_norm(name: str, d: torch.Tensor) -> float:
    if name.endswith("bias"):
        return float(d.double().norm()) / math.sqrt(d.numel())
    return float(d.double().abs().max())


def secant(params, names, embeddings, grad_change, step, with_vectors: bool) -> float | None:
    chosen = [p for p in params if with_vectors or measured(p)]
    if not chosen:
        return None
    top = sum(
        rms_dual_norm(grad_change[p], id(p) in embeddings)
        if measured(p)
        else vector_dual(names[p], grad_change[p])
        for p in chosen
    )
    bottom = max(
        rms_operator_norm(step[p], id(p) in embeddings)
        if measured(p)
        else vector_norm(names[p], step[p])
        for p in chosen
    )
    return top / bottom if bottom > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=61)
    parser.add_argument("--report-every", type=int, default=20)
    parser.add_argument("harness", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    harness = build_parser()
    task_args = harness.parse_args([a for a in args.harness if a != "--"] + ["--output", "-"])
    check_args(harness, task_args)
    task = build_task(task_args)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = build_task_model(task_args, task)
    opt = Muon(model, lr=0.05, momentum=0.95, fallback="adamw", adamw_lr=1e-3)
    names = {p: n for n, p in model.named_parameters()}
    layers = sorted(opt._layers.partition.layers, key=lambda layer: layer.position)
    embeddings = opt._layers.embedding_ids()
    order = batches(task.num_train, task_args.batch_size, torch.Generator().manual_seed(0))

    def gradients(idx):
        x, y = task.batch(idx)
        opt.zero_grad()
        task.loss(model, x, y).backward()
        return {p: p.grad.detach().clone() for p in model.parameters() if p.grad is not None}

    previous = None
    for k in range(args.steps):
        idx = order[k % len(order)]
        grad = gradients(idx)
        before = {p: p.detach().clone() for p in grad}
        opt.step()
        step = {p: p.detach() - before[p] for p in grad}
        if previous is not None and k % args.report_every == 0:
            after = gradients(idx)  # the same batch at the new point
            same = {p: after[p] - grad[p] for p in grad}
            noisy = {p: grad[p] - previous[0][p] for p in grad}
            print(f"\n### step {k}\n\n| layer | matrices | with vectors | same batch |")
            print("|---|---|---|---|")
            for layer in layers:
                params = [p for _, p in layer.params if p in grad]
                row = [
                    secant(params, names, embeddings, noisy, previous[1], False),
                    secant(params, names, embeddings, noisy, previous[1], True),
                    secant(params, names, embeddings, same, step, True),
                ]
                cells = " | ".join("-" if v is None else f"{v:.3g}" for v in row)
                print(f"| {layer.name} | {cells} |")
        previous = (grad, step)


if __name__ == "__main__":
    main()
