"""The study's third edition (issue 27; RESULTS.md section 3): can Drop-Muon beat a tuned Muon
beyond the paper's CNN? Runs every job below with ``dropmuon-compare``, in order, into
benchmarks/results/study3/<job>/ (summary.md with its command, runs/, sweep/, CSVs, plots),
appending each finished phase's wall time to benchmarks/results/study3/times.txt.

How every optimizer is tuned (the same way for all): its lr from a ladder of values (Muon
family: 0.0025 .. 0.32; AdamW and Drop-AdamW: 1e-4 .. 2e-2), starting from 4 middle values,
2 sweep seeds per value on the validation split, chosen by the median time to the setting's
*hardest* validation target (else the best final validation metric). A choice at either end of
its grid widens the grid by the next ladder value on that side and sweeps again, until every
choice is interior (or the ladder ends: flagged). Then 5 paired final seeds at the choice.

Every job but a setting's first (which tunes Muon) also reruns Muon's 5 final seeds at that
job's choice, in its own session (``--lr-grid muon=<choice>``: the harness sweeps the one
value on its 2 sweep seeds first): its rows are timed against this rerun, so a machine that got
faster or slower between sessions cannot pass for a speedup.

Resumable: interrupted, run it again (``--resume`` keeps every finished run, sweep runs too).
``--only JOB ...`` runs some jobs; ``--list`` prints them. Run it on an otherwise idle machine:
the times are wall-clock.

    python3 benchmarks/run_study3.py            # everything, about 10 hours on 2 cores
    python3 benchmarks/study3_tables.py > benchmarks/results/study3/tables.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from dropmuon.compare.stats import select_lr
from dropmuon.compare.train import OptimizerSpec

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "study3"
MUON_LADDER = [0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32]
ADAMW_LADDER = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]
ADAMW_KINDS = ("adamw", "dropadamw")
COMMON = ["--no-progress", "--threads", "2", "--resume", "--seeds", "0", "1", "2", "3", "4",
          "--sweep-seeds", "2"]  # fmt: skip


def image_setting(model: str, steps: int, every: int, targets: list[str], *extra: str) -> dict:
    """Fashion-MNIST, batch 256, 20,480 training images (80 steps an epoch) and 2,000 held out
    for validation; ``steps`` steps; selection on the hardest validation target."""
    splits = [a for split in ("train", "val", "test") for a in (f"--{split}-targets", *targets)]
    args = ["--dataset", "fashion-mnist", "--model", model, *extra, "--batch-size", "256",
            "--train-size", "20480", "--epochs", str(-(-steps // 80)), "--max-steps", str(steps),
            "--val-size",
            "2000", "--test-size", "1000", "--eval-train-size", "500", "--eval-every-steps",
            str(every), *splits]  # fmt: skip
    return dict(args=args, select=targets[-1])


# The settings: the second edition's (benchmarks/run_study.sh), with evaluations twice as
# often, ResNet-18 160 steps (2 epochs) instead of 80, and the selection on the hardest target.
SETTINGS = {
    "vit": image_setting("vit", 80, 10, ["0.65", "0.70", "0.75"]),
    "paper-cnn": image_setting("paper-cnn", 80, 10, ["0.70", "0.75", "0.80"]),
    "gpt": dict(
        args=[
            "--dataset",
            "fortunes",
            "--model",
            "gpt",
            "--context",
            "64",
            "--batch-size",
            "128",
            "--epochs",
            "1",
            "--max-steps",
            "300",
            "--val-size",
            "200",
            "--test-size",
            "400",
            "--eval-train-size",
            "400",
            "--eval-every-steps",
            "15",
            "--loss-targets",
            "2.6",
            "2.3",
            "2.1",
        ],
        select="2.1",
    ),  # fmt: skip
    "resnet18": image_setting("resnet18", 160, 20, ["0.50", "0.65", "0.75"], "--width", "16"),
}

DROP = ["dropmuon:uniform", "dropmuon:epoch_shift", "dropmuon:cost_optimal"]
BASELINE_MUONS = ["kj-muon", "po-muon", "po-adamuon", "po-normuon"]
# job: (setting, optimizers, extra arguments), in the order they run (most informative first).
JOBS = {
    "vit": ("vit", ["muon", "torch-muon", *DROP], []),
    "vit-blocks": ("vit", ["dropmuon:uniform", "dropmuon:cost_optimal"], ["--layers", "blocks"]),
    "vit-adamw": ("vit", ["adamw", "dropadamw:uniform"], []),
    "paper-cnn": ("paper-cnn", ["muon", "torch-muon", *DROP], []),
    "paper-cnn-adamw": ("paper-cnn", ["adamw", "dropadamw:uniform"], []),
    "gpt": ("gpt", ["muon", "torch-muon", *DROP], []),
    "gpt-blocks": ("gpt", ["dropmuon:uniform", "dropmuon:cost_optimal"], ["--layers", "blocks"]),
    "vit-baselines": ("vit", BASELINE_MUONS, []),
    "paper-cnn-baselines": ("paper-cnn", BASELINE_MUONS, []),
    "resnet18": ("resnet18", ["muon", "torch-muon", *DROP], []),
    "resnet18-blocks": (
        "resnet18", ["dropmuon:uniform", "dropmuon:cost_optimal"], ["--layers", "blocks"],
    ),
    # Only Keller Jordan's, the one baseline faster than our Muon elsewhere (the paper CNN): the
    # setting where Drop-Muon wins is timed against it too, in a third of the four's time.
    "resnet18-baselines": ("resnet18", ["kj-muon"], []),
    # Epoch_shift over depth units, the one pairing of question 1 the jobs above leave out (added
    # after them, so each reruns Muon in its own session like every other job).
    "resnet18-blocks-epoch-shift": ("resnet18", ["dropmuon:epoch_shift"], ["--layers", "blocks"]),
    "vit-blocks-epoch-shift": ("vit", ["dropmuon:epoch_shift"], ["--layers", "blocks"]),
    "gpt-blocks-epoch-shift": ("gpt", ["dropmuon:epoch_shift"], ["--layers", "blocks"]),
    # pytorch-optimizer's three on ResNet-18, after Keller Jordan's there (its own Muon rerun).
    "resnet18-po-baselines": ("resnet18", ["po-muon", "po-adamuon", "po-normuon"], []),
}  # fmt: skip


def base_job(setting: str) -> str:
    """The setting's first job: the one that tunes Muon."""
    return next(job for job, (job_setting, _, _) in JOBS.items() if job_setting == setting)


def muon_choice(setting: str) -> float:
    """The lr the setting's first job chose for Muon (its final runs')."""
    runs = sorted((OUT / base_job(setting) / "runs").glob("muon_seed*.json"))
    if not runs:
        raise SystemExit(f"job {base_job(setting)} first: it chooses Muon's lr for {setting}")
    return json.loads(runs[0].read_text())["lr"]


def ladder(name: str) -> list[float]:
    return ADAMW_LADDER if OptimizerSpec.parse(name).kind in ADAMW_KINDS else MUON_LADDER


def start_grid(name: str) -> list[float]:
    values = ladder(name)
    return values[2:6]  # four middle values: 0.01 .. 0.08, or 5e-4 .. 5e-3


def sweep_runs(folder: Path) -> dict[str, dict[float, list[dict]]]:
    found: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted((folder / "sweep").glob("*.json")):
        run = json.loads(path.read_text())
        found[run["optimizer"]][run["lr"]].append(run)
    return found


def grid_arguments(grids: dict[str, list[float]]) -> list[str]:
    values = [f"{name}={','.join(f'{v:g}' for v in grid)}" for name, grid in grids.items()]
    return ["--lr-grid", "0.01", *values]  # the plain value: required, used by none


def compare(folder: Path, setting: dict, optimizers, extra, grids, sweep_only: bool) -> None:
    command = [sys.executable, "-m", "dropmuon.compare", *COMMON, *setting["args"],
               "--select-target", setting["select"], "--optimizers", *optimizers, *extra,
               *grid_arguments(grids), "--output", str(folder)]  # fmt: skip
    if sweep_only:
        command.append("--sweep-only")
    log = folder.parent / f"{folder.name}.log"
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{folder.name}: dropmuon-compare failed, see {log}")


def widened(grids: dict[str, list[float]], folder: Path, metric: str, target: float) -> bool:
    """Widens each grid whose choice sits at an edge by the next ladder value on that side;
    returns whether any grid changed."""
    runs = sweep_runs(folder)
    changed = False
    for name, grid in grids.items():
        by_lr = {lr: runs[name][lr] for lr in grid}
        choice = select_lr(by_lr, metric, target)
        values = ladder(name)
        if choice.lr == grid[0] and values.index(grid[0]) > 0:
            grid.insert(0, values[values.index(grid[0]) - 1])
            changed = True
        elif choice.lr == grid[-1] and values.index(grid[-1]) < len(values) - 1:
            grid.append(values[values.index(grid[-1]) + 1])
            changed = True
    return changed


def run_job(name: str) -> None:
    setting_name, optimizers, extra = JOBS[name]
    setting = SETTINGS[setting_name]
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    grids_file = folder / "grids.json"
    names = [OptimizerSpec.parse(o).name for o in optimizers]
    grids = json.loads(grids_file.read_text()) if grids_file.is_file() else {}
    for n in names:
        grids.setdefault(n, start_grid(n))
    text = setting_name == "gpt"
    metric, target = ("val_loss" if text else "val_acc"), float(setting["select"])
    start = time.time()
    while True:
        compare(folder, setting, optimizers, extra, grids, sweep_only=True)
        if not widened(grids, folder, metric, target):
            break
        grids_file.write_text(json.dumps(grids, indent=1))
    grids_file.write_text(json.dumps(grids, indent=1))
    swept = time.time()
    if name != base_job(setting_name):  # Muon again, in this session (see the docstring)
        optimizers, grids = [*optimizers, "muon"], {**grids, "muon": [muon_choice(setting_name)]}
    compare(folder, setting, optimizers, extra, grids, sweep_only=False)
    with open(OUT / "times.txt", "a") as f:
        f.write(f"{name}: sweep {swept - start:.0f} s, final {time.time() - swept:.0f} s\n")
    print(f"{name}: done in {time.time() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        for name, (setting, optimizers, extra) in JOBS.items():
            print(f"{name}: {setting}, {' '.join(optimizers)} {' '.join(extra)}")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        run_job(name)


if __name__ == "__main__":
    main()
