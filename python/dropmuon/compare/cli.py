"""The main job's command line (``python -m dropmuon.compare`` or ``dropmuon-compare``): train
one model with several optimizers under the same budget and report time to accuracy.

The optimizers and what a run times are described in ``dropmuon.compare.train``.

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
from pathlib import Path

import torch

from .. import __version__
from .data import DATASETS, DatasetError, load_dataset
from .train import OPTIMIZER_KINDS, OptimizerSpec, train_run

DEFAULT_TARGETS = {
    "fashion-mnist": ([0.80, 0.85, 0.88], [0.80, 0.85, 0.87]),
    "mnist": ([0.90, 0.95, 0.97], [0.90, 0.95, 0.97]),
    "cifar10": ([0.40, 0.50, 0.60], [0.40, 0.50, 0.60]),
    "synthetic": ([0.50, 0.80, 0.95], [0.50, 0.80, 0.95]),
}


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
