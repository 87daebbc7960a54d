"""The main job: train one model with several optimizers under the same budget and report time
to accuracy (``python -m dropmuon.compare`` or ``dropmuon-compare``).

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

Each finished run is written at once (``runs/<name>.json``); ``runs.csv``, ``summary.md`` and
the plots are rewritten after every run, so an interrupted comparison leaves complete files for
the runs that finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import __version__
from .data import DATASETS, DatasetError, batches, load_dataset
from .models import build_model
from .optimizer import DropMuon, Muon
from .reference import SAMPLINGS

DEFAULT_TARGETS = {
    "fashion-mnist": ([0.80, 0.85, 0.88], [0.80, 0.85, 0.87]),
    "mnist": ([0.90, 0.95, 0.97], [0.90, 0.95, 0.97]),
    "cifar10": ([0.40, 0.50, 0.60], [0.40, 0.50, 0.60]),
    "synthetic": ([0.50, 0.80, 0.95], [0.50, 0.80, 0.95]),
}
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
        return OptimizerSpec(kind, sampling or ("uniform" if kind == "dropmuon" else None))


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


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_lr(values: list[str]) -> dict[str, float]:
    """``0.1`` (every optimizer) and/or ``name=value`` pairs."""
    table = {}
    for value in values:
        name, sep, number = value.rpartition("=")
        key = name if sep else "default"
        if sep and name not in OPTIMIZER_KINDS:
            raise argparse.ArgumentTypeError(f"--lr: unknown optimizer {name!r}")
        try:
            table[key] = float(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lr: {value!r} is not a number") from None
        if table[key] <= 0:
            raise argparse.ArgumentTypeError(f"--lr: {value!r} must be positive")
    table.setdefault("default", 0.1)
    table.setdefault("adamw", 1e-3)
    return table


def fixed_subset(x: torch.Tensor, y: torch.Tensor, size: int):
    """The first `size` images of a fixed shuffle (the same for every run and optimizer)."""
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:size]
    return x[keep], y[keep]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dropmuon-compare",
        description="Drop-Muon vs Muon (and torch.optim.Muon, AdamW): time to accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder of the dataset's files (default: its standard place)",
    )
    parser.add_argument("--model", default="paper-cnn", choices=["paper-cnn", "resnet18"])
    parser.add_argument(
        "--width",
        type=int,
        default=16,
        help="resnet18: channels of the first stage (64 in the original)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        type=OptimizerSpec.parse,
        default=[OptimizerSpec.parse(n) for n in ("dropmuon", "muon", "torch-muon")],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--epochs",
        type=int,
        default=10,
        help="epochs per run (an upper bound when --time-budget is set)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds of training per run; a run stops at the first step past it",
    )
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="use only the first N training images (a fixed shuffled subset)",
    )
    parser.add_argument(
        "--test-size",
        type=int,
        default=None,
        help="measure test accuracy on N test images only (a fixed shuffled subset)",
    )
    parser.add_argument(
        "--lr",
        nargs="+",
        default=["0.1"],
        help="learning rate: one value for all, and/or optimizer=value pairs; "
        "adamw defaults to 1e-3",
    )
    parser.add_argument(
        "--adamw-lr",
        type=float,
        default=1e-3,
        help="AdamW's lr for the non-matrix parameters of the Muon-family runs",
    )
    parser.add_argument("--momentum", type=float, default=0.95)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--ns-precision", default="bfloat16", choices=["bfloat16", "native"])
    parser.add_argument(
        "--train-targets",
        nargs="+",
        type=float,
        default=None,
        help="train-accuracy targets (default: per dataset)",
    )
    parser.add_argument(
        "--test-targets",
        nargs="+",
        type=float,
        default=None,
        help="test-accuracy targets (default: per dataset)",
    )
    parser.add_argument(
        "--eval-train-size",
        type=int,
        default=10000,
        help="train accuracy is measured on this many fixed training images",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--output",
        default="results/compare",
        help="results folder (runs/*.json, runs.csv, summary.md, *.png)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import report  # matplotlib is only needed here

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.lr = parse_lr(args.lr)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.batch_size < 1 or args.epochs < 1:
        parser.error("--batch-size and --epochs must be positive")
    for option in ("train_size", "test_size", "eval_train_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be positive, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load_dataset(args.dataset, args.data_dir)
    except DatasetError as error:
        print(f"dropmuon-compare: {error}", file=sys.stderr)
        return 2
    if args.train_size:
        data.train_x, data.train_y = fixed_subset(data.train_x, data.train_y, args.train_size)
    if args.test_size:
        data.test_x, data.test_y = fixed_subset(data.test_x, data.test_y, args.test_size)
    data = data.to(args.device)
    train_targets, test_targets = DEFAULT_TARGETS[args.dataset]
    args.train_targets = args.train_targets or train_targets
    args.test_targets = args.test_targets or test_targets

    output = Path(args.output)
    (output / "runs").mkdir(parents=True, exist_ok=True)
    meta = dict(
        command=" ".join(["dropmuon-compare", *(argv if argv is not None else sys.argv[1:])]),
        dataset=args.dataset,
        model=args.model,
        width=args.width if args.model == "resnet18" else None,
        train_size=len(data.train_x),
        test_size=len(data.test_x),
        batch_size=args.batch_size,
        lr=args.lr,
        adamw_lr=args.adamw_lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        ns_precision=args.ns_precision,
        epochs=args.epochs,
        time_budget=args.time_budget,
        train_targets=args.train_targets,
        test_targets=args.test_targets,
        device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        dropmuon=__version__,
        machine=f"{platform.machine()}, {os.cpu_count()} cpus",
    )
    warm_up(args, data)
    runs = []
    total = len(args.optimizers) * len(args.seeds)
    try:
        # Seed-major order: an interrupted comparison keeps whole optimizer sets per seed.
        for seed in args.seeds:
            for spec in args.optimizers:
                progress = None
                if not args.no_progress:
                    from tqdm import tqdm

                    steps = args.epochs * (len(data.train_x) // args.batch_size or 1)
                    progress = tqdm(
                        total=steps,
                        desc=f"[{len(runs) + 1}/{total}] {spec.name} seed {seed}",
                        unit="step",
                        leave=False,
                    )
                run = train_run(spec, seed, data, args, progress)
                if progress is not None:
                    progress.close()
                run["meta"] = meta
                _write_json(output / "runs" / f"{spec.name.replace(':', '-')}_seed{seed}.json", run)
                runs.append(run)
                report.write_all(output, runs, meta)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(runs)} finished runs are in {output}", file=sys.stderr)
        return 130
    print((output / "summary.md").read_text())
    return 0


def warm_up(args, data) -> None:
    """Two untimed steps of every optimizer first: BLAS/oneDNN/cuBLAS pick and compile their
    kernels on first use, which would otherwise land in whichever run comes first."""
    quick = argparse.Namespace(
        **{**vars(args), "epochs": 1, "time_budget": 1e-9, "eval_train_size": 1}
    )
    tiny = type(data)(
        data.name,
        data.train_x[: 2 * args.batch_size],
        data.train_y[: 2 * args.batch_size],
        data.test_x[:1],
        data.test_y[:1],
        data.num_classes,
    )
    for spec in args.optimizers:
        train_run(spec, 0, tiny, quick)


def _write_json(path: Path, payload: dict) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
