"""The optimizers the harness compares, and one timed training run.

Optimizers (``--optimizers``):
  ``dropmuon[:sampling]``  DropMuon (``uniform`` by default; any sampling name of DropMuon),
  ``muon``                 dropmuon.Muon (DropMuon with full sampling),
  ``dropadamw[:sampling]`` "Drop-AdamW": DropMuon's sampling and truncation with AdamW as every
                           parameter's update (``norms`` adamw for every role; its lr is AdamW's,
                           from the grid), the ablation that separates dropping from the geometry,
  ``torch-muon``           torch.optim.Muon on every 2-D weight, conv kernels included: each conv
                           weight is re-registered as a 2-D (out, in*kh*kw) parameter through
                           ``torch.nn.utils.parametrize`` (reshaped back to 4-D in forward); plus
                           torch.optim.AdamW on the rest (biases),
  ``adamw``                torch.optim.AdamW on everything,
  ``kj-muon``, ``po-muon``, ``po-adamuon``, ``po-normuon``: the Muon implementations people
                           already run, from optional packages (:mod:`dropmuon.compare.baselines`).
DropMuon and Muon use ``fallback="adamw"`` with the same AdamW settings as ``torch-muon``, so
that the Muon-family runs differ only in which layers they update.

Wall-clock is the training steps only (batch gather, forward, backward, optimizer step; the
device synchronised around each phase), not evaluation. What is evaluated, on which splits, is
``dropmuon.compare.tasks``'.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import DropMuon, Muon
from ..defaults import DEFAULT_SAMPLING, SAMPLINGS
from .baselines import BASELINES, build_baseline, flatten_conv_kernels
from .data import batches, steps_per_epoch
from .models import build_language_model, build_model

OPTIMIZER_KINDS = ("dropmuon", "dropadamw", "muon", "torch-muon", "adamw", *BASELINES)
SAMPLED_KINDS = ("dropmuon", "dropadamw")  # the kinds that take a sampling
# Drop-AdamW: every role's norm is AdamW.
ADAMW_EVERYWHERE = {"matrix": "adamw", "head": "adamw", "embedding": "adamw"}


@dataclass(frozen=True)
class OptimizerSpec:
    """``kind[:sampling[:tau=k]]``: ``dropmuon:tau_nice:tau=2`` is DropMuon with tau_nice
    sampling over 2 layers per step."""

    kind: str
    sampling: str | None = None
    tau: int | None = None

    @property
    def name(self) -> str:
        parts = [self.kind] + ([self.sampling] if self.sampling else [])
        return ":".join(parts + ([f"tau={self.tau}"] if self.tau is not None else []))

    @property
    def file_stem(self) -> str:
        return self.name.replace(":", "-")

    @staticmethod
    def parse(text: str) -> OptimizerSpec:
        kind, _, rest = text.partition(":")
        sampling, _, option = rest.partition(":")
        if kind not in OPTIMIZER_KINDS:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {text!r}; choose from {', '.join(OPTIMIZER_KINDS)} "
                "(dropmuon may take ':<sampling>', and tau_nice ':tau=<k>')"
            )
        if sampling and kind not in SAMPLED_KINDS:
            raise argparse.ArgumentTypeError(
                f"only dropmuon and dropadamw take a sampling, not {kind!r}"
            )
        if sampling and sampling not in SAMPLINGS:
            raise argparse.ArgumentTypeError(
                f"unknown sampling {sampling!r}; choose from {', '.join(SAMPLINGS)}"
            )
        tau = None
        if sampling == "tau_nice":
            key, _, value = option.partition("=")
            if key != "tau" or not value.isdigit() or int(value) < 1:
                raise argparse.ArgumentTypeError(
                    f"{text!r}: tau_nice needs ':tau=<k>' with k >= 1, e.g. dropmuon:tau_nice:tau=2"
                )
            tau = int(value)
        elif option:
            raise argparse.ArgumentTypeError(f"{text!r}: only tau_nice takes an option")
        default = DEFAULT_SAMPLING if kind in SAMPLED_KINDS else None
        return OptimizerSpec(kind, sampling or default, tau)


# ----------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------


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


def build_optimizer(spec: OptimizerSpec, model: nn.Module, args, seed: int, total_steps: int, lr):
    """The optimizer of ``spec`` for ``model`` at learning rate ``lr`` (the Muon family: for
    matrices; AdamW: for everything). ``args.log_smoothness`` turns DropMuon's smoothness
    estimates on."""
    common = dict(lr=lr, momentum=args.momentum, nesterov=True, weight_decay=args.weight_decay)
    if spec.kind in ("dropmuon", "dropadamw", "muon"):
        drop_adamw = spec.kind == "dropadamw"
        options = dict(
            common,
            fallback="adamw",
            adamw_lr=lr if drop_adamw else args.adamw_lr,
            **({"norms": ADAMW_EVERYWHERE} if drop_adamw else {}),
            ns_precision=args.ns_precision,
            estimate_smoothness=True if getattr(args, "log_smoothness", False) else None,
            layers=getattr(args, "layers", "modules"),
        )
        if getattr(args, "smoothness_every", None) is not None:
            options["smoothness_every"] = args.smoothness_every
        if spec.kind == "muon":
            return Muon(model, **options)
        extra = {"total_steps": total_steps} if spec.sampling == "epoch_shift" else {}
        if spec.tau is not None:
            extra["tau"] = spec.tau
        return DropMuon(model, sampling=spec.sampling, seed=seed, **options, **extra)
    if spec.kind in BASELINES:
        return build_baseline(spec.kind, model, args, lr)
    if spec.kind == "torch-muon":
        flatten_conv_kernels(model)
        matrices = [p for p in model.parameters() if p.dim() == 2]
        rest = [p for p in model.parameters() if p.dim() != 2]
        muon = torch.optim.Muon(matrices, **common)
        adamw = (
            torch.optim.AdamW(rest, lr=args.adamw_lr, weight_decay=args.weight_decay)
            if rest
            else None
        )
        return Combined(muon, adamw)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)


def learning_rate(spec: OptimizerSpec, table: dict[str, float]) -> float:
    """The lr for ``spec`` from an ``--lr`` table: by full name, then kind, then default."""
    for key in (spec.name, spec.kind):
        if key in table:
            return table[key]
    return table["default"]


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_task_model(args, task) -> nn.Module:
    if task.kind == "language-model":
        return build_language_model(args.model, task.vocab_size, task.context)
    options = {"width": args.width} if args.model == "resnet18" else {}
    return build_model(args.model, task.in_channels, task.num_classes, task.image_size, **options)


def fingerprint(values) -> float:
    """A number that two runs share when they start from the same tensors (or indices)."""
    total = 0.0
    for i, t in enumerate(values):
        flat = t.detach().double().flatten()
        weights = torch.arange(1, len(flat) + 1, dtype=torch.float64, device=flat.device)
        total += (i + 1) * float((flat * weights.remainder(97)).sum())
    return total


def train_run(spec: OptimizerSpec, seed: int, task, args, lr: float, progress=None) -> dict:
    """One timed run. Evaluates every ``args.eval_every_steps`` steps and at the end (every
    epoch's end without it); evaluation is not on the clock. The same ``seed`` gives every
    optimizer the same initial weights and the same batches (``init_fingerprint``,
    ``order_fingerprint`` in the result say so)."""
    device = torch.device(args.device)
    torch.manual_seed(seed)
    model = build_task_model(args, task).to(device)
    init_fingerprint = fingerprint(p for _, p in sorted(model.named_parameters()))
    epoch_steps = steps_per_epoch(task.num_train, args.batch_size)
    max_steps = getattr(args, "max_steps", None)
    total_steps = min(epoch_steps * args.epochs, max_steps or math.inf)
    optimizer = build_optimizer(spec, model, args, seed, total_steps, lr)
    shuffle = torch.Generator().manual_seed(seed)
    every = getattr(args, "eval_every_steps", None)

    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    train_time, step, evals, cutoffs, losses = 0.0, 0, [], [], []
    order_fingerprint = None

    def evaluate(epoch: float) -> None:
        record = dict(
            epoch=epoch,
            step=step,
            train_time=train_time,
            running_loss=sum(losses) / max(len(losses), 1),
            **task.evaluate(model),
            **{f"{k}_time": v for k, v in phases.items()},
        )
        if getattr(args, "log_smoothness", False) and isinstance(optimizer, DropMuon):
            record["smoothness"] = list(optimizer.smoothness)
        evals.append(record)
        losses.clear()

    out_of_time = False
    for epoch in range(1, args.epochs + 1):
        epoch_batches = batches(task.num_train, args.batch_size, shuffle)
        if order_fingerprint is None:
            order_fingerprint = fingerprint(epoch_batches[:8])
        for idx in epoch_batches:
            if isinstance(optimizer, DropMuon):
                cutoffs.append(optimizer.cutoff)
            synchronize(device)
            t0 = time.perf_counter()
            x, y = task.batch(idx.to(device, non_blocking=True))
            optimizer.zero_grad()
            loss = task.loss(model, x, y)
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
            if every and step % every == 0:
                evaluate(step / epoch_steps)
            out_of_time = bool(args.time_budget and train_time >= args.time_budget)
            out_of_time = out_of_time or step == max_steps
            if out_of_time:
                break
        if out_of_time:
            break
        if not every:
            evaluate(float(epoch))
    if not evals or evals[-1]["step"] != step:  # the end, if not just evaluated
        evaluate(step / epoch_steps)
    return dict(
        optimizer=spec.name,
        seed=seed,
        lr=lr,
        evals=evals,
        cutoffs=cutoffs,
        update_counts=getattr(optimizer, "update_counts", None),
        layer_names=optimizer.layer_names() if isinstance(optimizer, DropMuon) else None,
        steps_per_epoch=epoch_steps,
        init_fingerprint=init_fingerprint,
        order_fingerprint=order_fingerprint,
    )
