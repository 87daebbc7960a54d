"""The main job's command line (``python -m dropmuon.compare`` or ``dropmuon-compare``): train
one model with several optimizers under the same budget and report time to a target, with
paired per-seed speedups and their 95% bootstrap intervals.

The optimizers and what a run times are described in ``dropmuon.compare.train``, the splits and
metrics in ``dropmuon.compare.tasks``, the sweep and the files in
``dropmuon.compare.experiment``, the statistics in ``dropmuon.compare.stats``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from .. import __version__
from .baselines import BASELINES
from .data import DATASETS, DatasetError, load_dataset, steps_per_epoch
from .experiment import Experiment
from .models import IMAGE_MODELS, MODELS, TEXT_MODELS
from .tasks import ImageTask, TextTask
from .text import TEXT_DATASETS, load_text
from .train import OPTIMIZER_KINDS, OptimizerSpec, learning_rate, train_run

DEFAULT_TARGETS = {  # (train, test) accuracy targets; validation ones default to the test ones
    "fashion-mnist": ([0.80, 0.85, 0.88], [0.80, 0.85, 0.87]),
    "mnist": ([0.90, 0.95, 0.97], [0.90, 0.95, 0.97]),
    "cifar10": ([0.40, 0.50, 0.60], [0.40, 0.50, 0.60]),
    "synthetic": ([0.50, 0.80, 0.95], [0.50, 0.80, 0.95]),
}
DEFAULT_LOSS_TARGETS = {  # per-character cross-entropy (nats) targets for language modelling
    "fortunes": [2.6, 2.3, 2.0],
    "synthetic-text": [2.5, 2.0, 1.5],
}


# The options every run's meta (and the summary's header) records as they were given.
RECORDED_OPTIONS = (
    "batch_size", "lr", "lr_grid", "sweep_seeds", "select_target", "adamw_lr", "momentum",
    "weight_decay", "ns_precision", "epochs", "time_budget", "max_steps", "eval_every_steps",
    "layers", "smoothness_every",
)  # fmt: skip


def _optimizer_key(name: str, option: str) -> str:
    if name in OPTIMIZER_KINDS:
        return name
    try:
        return OptimizerSpec.parse(name).name
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{option}: unknown optimizer {name!r}") from None


def _positive(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option}: {text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{option}: {text!r} must be positive")
    return value


def parse_lr(values: list[str]) -> dict[str, float]:
    """``0.1`` (every optimizer) and/or ``name=value`` pairs (a kind or a full optimizer name,
    e.g. ``adamw=1e-3`` or ``dropmuon:epoch_shift=0.05``)."""
    table = {}
    for value in values:
        name, sep, number = value.rpartition("=")
        key = _optimizer_key(name, "--lr") if sep else "default"
        table[key] = _positive(number, "--lr")
    table.setdefault("default", 0.1)
    table.setdefault("adamw", 1e-3)
    return table


def parse_lr_grid(values: list[str]) -> dict[str, list[float]]:
    """``v1 v2 ...`` (every optimizer) and/or ``name=v1,v2,...`` (one optimizer's grid)."""
    table: dict[str, list[float]] = {}
    for value in values:
        name, sep, numbers = value.rpartition("=")
        key = _optimizer_key(name, "--lr-grid") if sep else "default"
        for number in numbers.split(","):
            table.setdefault(key, []).append(_positive(number, "--lr-grid"))
    if "default" not in table:
        raise argparse.ArgumentTypeError(
            "--lr-grid needs plain values for the optimizers without a grid of their own"
        )
    return {key: sorted(set(grid)) for key, grid in table.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dropmuon-compare",
        description="Drop-Muon vs Muon (and torch.optim.Muon, AdamW): time to a target.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--dataset", default="fashion-mnist", choices=DATASETS + TEXT_DATASETS)
    add(
        "--data-dir",
        default=None,
        help="folder of the dataset's files (default: its standard place)",
    )
    add(
        "--model",
        default="paper-cnn",
        choices=MODELS,
        help=f"images: {', '.join(IMAGE_MODELS)}; text: {', '.join(TEXT_MODELS)}",
    )
    add(
        "--width",
        type=int,
        default=16,
        help="resnet18: channels of the first stage (64 in the original)",
    )
    add("--context", type=int, default=64, help="gpt: characters per training window")
    add(
        "--optimizers",
        nargs="+",
        type=OptimizerSpec.parse,
        default=[OptimizerSpec.parse(n) for n in ("dropmuon", "muon", "torch-muon")],
        help="dropmuon[:<sampling>] (tau_nice: dropmuon:tau_nice:tau=<k>), muon, torch-muon, "
        "adamw, dropadamw[:<sampling>] (Drop-AdamW: AdamW as every layer's update); "
        "baselines from other packages (pip install 'dropmuon[baselines]'): "
        + ", ".join(f"{b.name} ({b.summary})" for b in BASELINES.values()),
    )
    add("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds of the final runs")
    add(
        "--epochs",
        type=int,
        default=10,
        help="epochs per run (an upper bound when --time-budget is set)",
    )
    add(
        "--time-budget",
        type=float,
        default=None,
        help="seconds of training per run; a run stops at the first step past it",
    )
    add(
        "--max-steps",
        type=int,
        default=None,
        help="stop a run after N optimizer steps (epoch_shift's schedule then spans N steps)",
    )
    add("--batch-size", type=int, default=8192)
    add(
        "--train-size",
        type=int,
        default=None,
        help="use only N training samples (a fixed subset, disjoint from the validation split)",
    )
    add(
        "--val-size",
        type=int,
        default=None,
        help="hold out N training samples as the validation split (what --lr-grid selects on)",
    )
    add(
        "--test-size",
        type=int,
        default=None,
        help="measure on N test samples only (a fixed subset)",
    )
    add(
        "--eval-train-size",
        type=int,
        default=10000,
        help="training metrics are measured on this many fixed training samples",
    )
    add(
        "--eval-every-steps",
        type=int,
        default=None,
        help=(
            "evaluate every N steps and at the end (default: every epoch's end); time to a target "
            "is then resolved to N steps"
        ),
    )
    add(
        "--lr",
        nargs="+",
        default=["0.1"],
        help=(
            "learning rate: one value for all, and/or optimizer=value pairs; adamw defaults to 1e-3"
        ),
    )
    add(
        "--lr-grid",
        nargs="+",
        default=None,
        help=(
            "sweep: values for all, and/or optimizer=v1,v2,... grids; each optimizer's lr is "
            "chosen on the validation split (needs --val-size), then the final --seeds run at it"
        ),
    )
    add(
        "--sweep-seeds",
        type=int,
        default=2,
        help="--lr-grid: runs per grid value (seeds 1000, 1001, ...)",
    )
    add(
        "--sweep-only",
        action="store_true",
        help="--lr-grid: run the sweep and write sweep.csv with each choice, no final runs "
        "(to widen a grid whose choice sits at an edge, then run again with --resume)",
    )
    add(
        "--select-target",
        type=float,
        default=None,
        help=(
            "--lr-grid: choose by median time to this validation accuracy (or loss, for text); "
            "default, or when no value reaches it: the best final validation metric"
        ),
    )
    add(
        "--adamw-lr",
        type=float,
        default=1e-3,
        help="AdamW's lr for the non-matrix parameters of the Muon-family runs",
    )
    add("--momentum", type=float, default=0.95)
    add("--weight-decay", type=float, default=0.0)
    add("--ns-precision", default="bfloat16", choices=["bfloat16", "native"])
    add(
        "--train-targets",
        nargs="+",
        type=float,
        default=None,
        help="train-accuracy targets (default: per dataset)",
    )
    add(
        "--val-targets",
        nargs="+",
        type=float,
        default=None,
        help="validation-accuracy targets (default: the test ones)",
    )
    add(
        "--test-targets",
        nargs="+",
        type=float,
        default=None,
        help="test-accuracy targets (default: per dataset)",
    )
    add(
        "--loss-targets",
        nargs="+",
        type=float,
        default=None,
        help="text: train/validation/test loss targets, nats per character (default: per dataset)",
    )
    add(
        "--layers",
        default="modules",
        choices=["modules", "blocks"],
        help="DropMuon/Muon: what a layer is, each module holding parameters or depth units",
    )
    add(
        "--smoothness-every",
        type=int,
        default=None,
        help="DropMuon/Muon: refresh each layer's smoothness estimate every k of its steps "
        "(default: the library's, 10)",
    )
    add(
        "--log-smoothness",
        action="store_true",
        help=(
            "record DropMuon's per-layer smoothness estimates at each evaluation (turns the "
            "estimates on; any sampling)"
        ),
    )
    add(
        "--resume",
        action="store_true",
        help=(
            "keep the runs already written in --output (same optimizer, seed and lr) instead of "
            "rerunning them"
        ),
    )
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--threads", type=int, default=None, help="torch CPU threads")
    add(
        "--output",
        default="results/compare",
        help="results folder (runs/, sweep/, runs.csv, sweep.csv, summary.md, *.png)",
    )
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def check_args(parser, args) -> None:
    try:
        args.lr = parse_lr(args.lr)
        args.lr_grid = parse_lr_grid(args.lr_grid) if args.lr_grid else None
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.sweep_only and not args.lr_grid:
        parser.error("--sweep-only needs --lr-grid")
    if args.smoothness_every is not None and args.smoothness_every < 1:
        parser.error(f"--smoothness-every must be >= 1, got {args.smoothness_every}")
    text = args.dataset in TEXT_DATASETS
    if text != (args.model in TEXT_MODELS):
        parser.error(
            f"--model {args.model} does not go with --dataset {args.dataset}: text datasets "
            f"({', '.join(TEXT_DATASETS)}) take {', '.join(TEXT_MODELS)}, images "
            f"{', '.join(IMAGE_MODELS)}"
        )
    for option in ("batch_size", "epochs", "sweep_seeds", "context"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be positive")
    for option in (
        "train_size", "val_size", "test_size", "eval_train_size", "eval_every_steps", "max_steps"
    ):  # fmt: skip
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be positive, got {value}")
    if args.lr_grid and not args.val_size:
        parser.error("--lr-grid chooses on the validation split: give --val-size too")
    names = [spec.name for spec in args.optimizers]
    if len(set(names)) != len(names):
        parser.error(f"--optimizers: {names} names one optimizer twice")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.select_metric = "val_loss" if text else "val_acc"


def build_task(args):
    if args.dataset in TEXT_DATASETS:
        data = load_text(args.dataset, args.data_dir)
        return TextTask.from_dataset(
            data, args.context, args.val_size, args.train_size, args.test_size, args.eval_train_size
        )
    data = load_dataset(args.dataset, args.data_dir)
    return ImageTask.from_dataset(
        data, args.val_size, args.train_size, args.test_size, args.eval_train_size
    )


def targets(args, task) -> list[tuple[str, float]]:
    """The (metric, target) pairs the report measures time to."""
    splits = ["train"] + (["val"] if args.val_size else []) + ["test"]
    if task.kind == "language-model":
        losses = args.loss_targets or DEFAULT_LOSS_TARGETS.get(args.dataset, [2.5, 2.0])
        return [(f"{split}_loss", t) for split in splits for t in losses]
    train, test = DEFAULT_TARGETS.get(args.dataset, DEFAULT_TARGETS["synthetic"])
    per_split = {
        "train": args.train_targets or train,
        "val": args.val_targets or args.test_targets or test,
        "test": args.test_targets or test,
    }
    return [(f"{split}_acc", t) for split in splits for t in per_split[split]]


def main(argv: list[str] | None = None) -> int:
    from . import report  # matplotlib is only needed here

    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        task = build_task(args)
    except (DatasetError, ValueError) as error:
        print(f"dropmuon-compare: {error}", file=sys.stderr)
        return 2
    epoch_steps = steps_per_epoch(task.num_train, args.batch_size)
    if args.max_steps and args.max_steps > epoch_steps * args.epochs:
        # Else the run would stop at the last epoch's end, short of the steps asked for.
        print(
            f"dropmuon-compare: --max-steps {args.max_steps} is more than --epochs "
            f"{args.epochs} holds ({epoch_steps} steps an epoch): give --epochs "
            f"{-(-args.max_steps // epoch_steps)} or more",
            file=sys.stderr,
        )
        return 2
    task = task.to(args.device)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    meta = dict(
        command=" ".join(["dropmuon-compare", *(argv if argv is not None else sys.argv[1:])]),
        dataset=args.dataset,
        model=args.model,
        task=task.kind,
        width=args.width if args.model == "resnet18" else None,
        context=args.context if task.kind == "language-model" else None,
        **task.sizes(),
        **{option: getattr(args, option) for option in RECORDED_OPTIONS},
        targets=targets(args, task),
        device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        dropmuon=__version__,
        machine=f"{platform.machine()}, {os.cpu_count()} cpus",
    )
    warm_up(args, task)
    sweep = selections = None

    def write_report(runs):
        report.write_all(output, runs, meta, sweep, selections)

    experiment = Experiment(args, task, meta, output, on_run=write_report)
    try:
        if args.lr_grid:
            sweep, selections = experiment.sweep()
            report.write_sweep_csv(output / "sweep.csv", sweep, selections, meta)
            if args.sweep_only:
                for name, selection in selections.items():
                    edge = " (at the grid's edge)" if selection.at_edge else ""
                    print(f"{name}: lr {selection.lr:g} by {selection.criterion}{edge}")
                return 0
            lrs = {name: selection.lr for name, selection in selections.items()}
        else:
            lrs = {spec.name: learning_rate(spec, args.lr) for spec in args.optimizers}
        experiment.final(lrs)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished runs are in {output}", file=sys.stderr)
        return 130
    if experiment.resumed:
        print(f"(--resume: {experiment.resumed} runs were loaded, not rerun)", file=sys.stderr)
    print((output / "summary.md").read_text())
    return 0


def warm_up(args, task) -> None:
    """One or two untimed steps of every optimizer first: BLAS/oneDNN/cuBLAS pick and compile
    their kernels on first use, which would otherwise land in whichever run comes first."""
    quick = argparse.Namespace(
        **{**vars(args), "epochs": 1, "time_budget": 1e-9, "eval_every_steps": None,
           "log_smoothness": False}
    )  # fmt: skip
    tiny = task.for_warm_up()
    for spec in args.optimizers:
        train_run(spec, 0, tiny, quick, learning_rate(spec, args.lr))
