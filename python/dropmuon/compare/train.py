"""The optimizers the harness compares, and one timed training run.

Optimizers (``--optimizers``):
  ``dropmuon[:sampling]``  DropMuon (``uniform`` by default; any sampling name of DropMuon),
  ``muon``                 dropmuon.Muon (DropMuon with full sampling),
  ``torch-muon``           torch.optim.Muon on every 2-D weight, conv kernels included: each conv
                           weight is re-registered as a 2-D (out, in*kh*kw) parameter through
                           ``torch.nn.utils.parametrize`` (reshaped back to 4-D in forward); plus
                           torch.optim.AdamW on the rest (biases),
  ``adamw``                torch.optim.AdamW on everything.
DropMuon and Muon use ``fallback="adamw"`` with the same AdamW settings as ``torch-muon``, so
that the Muon-family runs differ only in which layers they update.

Wall-clock is the training steps only (batch gather, forward, backward, optimizer step; the
device synchronised around each phase), not evaluation. Train accuracy is measured on a fixed
subset of the training set (``--eval-train-size``), test accuracy on the whole test set (or a
fixed subset of it, ``--test-size``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import DropMuon, Muon
from ..defaults import DEFAULT_SAMPLING, SAMPLINGS
from .data import batches
from .models import build_model

OPTIMIZER_KINDS = ("dropmuon", "muon", "torch-muon", "adamw")


@dataclass(frozen=True)
class OptimizerSpec:
    kind: str
    sampling: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.sampling}" if self.sampling else self.kind

    @staticmethod
    def parse(text: str) -> OptimizerSpec:
        kind, _, sampling = text.partition(":")
        if kind not in OPTIMIZER_KINDS:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {text!r}; choose from {', '.join(OPTIMIZER_KINDS)} "
                "(dropmuon may take ':<sampling>')"
            )
        if sampling and kind != "dropmuon":
            raise argparse.ArgumentTypeError(f"only dropmuon takes a sampling, not {kind!r}")
        if sampling and sampling not in SAMPLINGS:
            raise argparse.ArgumentTypeError(
                f"unknown sampling {sampling!r}; choose from {', '.join(SAMPLINGS)}"
            )
        return OptimizerSpec(kind, sampling or (DEFAULT_SAMPLING if kind == "dropmuon" else None))


# ----------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------


class FlattenedKernel(nn.Module):
    """Parametrization holding a conv kernel as a 2-D (out, in*kh*kw) parameter."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, matrix):
        return matrix.reshape(self.shape)

    def right_inverse(self, kernel):
        return kernel.reshape(kernel.shape[0], -1)


class Combined:
    """Steps several optimizers as one (torch.optim.Muon for matrices + AdamW for the rest)."""

    def __init__(self, *optimizers) -> None:
        self.optimizers = [o for o in optimizers if o is not None]

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad()

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def build_optimizer(spec: OptimizerSpec, model: nn.Module, args, seed: int, total_steps: int):
    lr = args.lr.get(spec.kind, args.lr.get("default"))
    common = dict(lr=lr, momentum=args.momentum, nesterov=True, weight_decay=args.weight_decay)
    if spec.kind in ("dropmuon", "muon"):
        options = dict(
            common, fallback="adamw", adamw_lr=args.adamw_lr, ns_precision=args.ns_precision
        )
        if spec.kind == "muon":
            return Muon(model, **options)
        extra = {"total_steps": total_steps} if spec.sampling == "epoch_shift" else {}
        return DropMuon(model, sampling=spec.sampling, seed=seed, **options, **extra)
    if spec.kind == "torch-muon":
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                parametrize.register_parametrization(
                    module, "weight", FlattenedKernel(module.weight.shape)
                )
        matrices = [p for p in model.parameters() if p.dim() == 2]
        rest = [p for p in model.parameters() if p.dim() != 2]
        muon = torch.optim.Muon(matrices, **common)
        adamw = (
            torch.optim.AdamW(rest, lr=args.adamw_lr, weight_decay=args.weight_decay)
            if rest
            else None
        )
        return Combined(muon, adamw)
    return torch.optim.AdamW(
        model.parameters(), lr=args.lr.get("adamw", args.adamw_lr), weight_decay=args.weight_decay
    )


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), chunk):
        correct += (model(x[start : start + chunk]).argmax(1) == y[start : start + chunk]).sum()
    model.train()
    return int(correct) / len(x)


def train_run(spec: OptimizerSpec, seed: int, data, args, progress=None) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(seed)
    model = build_model(
        args.model,
        data.in_channels,
        data.num_classes,
        data.image_size,
        **({"width": args.width} if args.model == "resnet18" else {}),
    )
    model.to(device)
    steps_per_epoch = len(batches(len(data.train_x), args.batch_size, torch.Generator()))
    optimizer = build_optimizer(spec, model, args, seed, steps_per_epoch * args.epochs)
    shuffle = torch.Generator().manual_seed(seed)
    eval_order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(0))
    eval_idx = eval_order[: args.eval_train_size].to(device)
    loss_fn = nn.CrossEntropyLoss()

    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    train_time, step, epochs, cutoffs = 0.0, 0, [], []
    out_of_time = False
    for epoch in range(1, args.epochs + 1):
        losses = []
        for idx in batches(len(data.train_x), args.batch_size, shuffle):
            if isinstance(optimizer, DropMuon):
                cutoffs.append(optimizer.cutoff)
            synchronize(device)
            t0 = time.perf_counter()
            idx = idx.to(device, non_blocking=True)
            x, y = data.train_x[idx], data.train_y[idx]
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            synchronize(device)
            t1 = time.perf_counter()
            loss.backward()
            synchronize(device)
            t2 = time.perf_counter()
            optimizer.step()
            synchronize(device)
            t3 = time.perf_counter()
            phases["forward"] += t1 - t0
            phases["backward"] += t2 - t1
            phases["optimizer"] += t3 - t2
            train_time += t3 - t0
            step += 1
            losses.append(loss.item())
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}", t=f"{train_time:.0f}s")
            if args.time_budget and train_time >= args.time_budget:
                out_of_time = True
                break
        record = dict(
            epoch=epoch,
            step=step,
            train_time=train_time,
            train_loss=sum(losses) / max(len(losses), 1),
            train_acc=accuracy(model, data.train_x[eval_idx], data.train_y[eval_idx]),
            test_acc=accuracy(model, data.test_x, data.test_y),
            **{f"{k}_time": v for k, v in phases.items()},
        )
        epochs.append(record)
        if out_of_time:
            break
    if isinstance(optimizer, DropMuon):
        optimizer.unfreeze()
    return dict(
        optimizer=spec.name,
        seed=seed,
        epochs=epochs,
        cutoffs=cutoffs,
        update_counts=getattr(optimizer, "update_counts", None),
        steps_per_epoch=steps_per_epoch,
    )
