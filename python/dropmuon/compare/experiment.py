"""A comparison from start to finish: the optional learning-rate sweep on the validation split,
then the final runs at each optimizer's chosen lr, each run written the moment it finishes and
skipped on ``--resume`` when its file is already there.

Files in ``--output``: ``sweep/<optimizer>_lr<value>_seed<k>.json`` (sweep runs, on seeds
``SWEEP_SEED_BASE + i``, kept apart from the final seeds), ``sweep.csv``, and
``runs/<optimizer>_seed<k>.json`` (final runs); the report (``dropmuon.compare.report``)
rewrites ``runs.csv``, ``summary.md`` and the plots after every run.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import stats
from .data import steps_per_epoch
from .train import OptimizerSpec, learning_rate, train_run

SWEEP_SEED_BASE = 1000  # sweep seeds 1000, 1001, ...: never the final runs' seeds


def write_json(path: Path, payload: dict) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


class Experiment:
    """Runs (or, with ``resume``, loads) every run of a comparison in a fixed order."""

    def __init__(self, args, task, meta: dict, output: Path, on_run=None) -> None:
        self.args, self.task, self.meta, self.output = args, task, meta, output
        self.on_run = on_run  # called with each finished run (new or loaded)
        self.resumed = 0

    def run(self, spec: OptimizerSpec, seed: int, lr: float, path: Path, label: str) -> dict:
        if self.args.resume and path.is_file():
            run = json.loads(path.read_text())
            if run.get("lr") == lr:
                self.resumed += 1
                return run
        progress = None
        if not self.args.no_progress:
            from tqdm import tqdm

            steps = self.args.epochs * steps_per_epoch(self.task.num_train, self.args.batch_size)
            steps = min(steps, self.args.max_steps or steps)
            progress = tqdm(total=steps, desc=label, unit="step", leave=False)
        run = train_run(spec, seed, self.task, self.args, lr, progress)
        if progress is not None:
            progress.close()
        run["meta"] = self.meta
        write_json(path, run)
        return run

    def sweep(self) -> tuple[dict[str, dict[float, list[dict]]], dict[str, stats.Selection]]:
        """Every grid value of every optimizer on the sweep seeds; the selection of each."""
        folder = self.output / "sweep"
        folder.mkdir(parents=True, exist_ok=True)
        results: dict[str, dict[float, list[dict]]] = {}
        selections = {}
        seeds = [SWEEP_SEED_BASE + i for i in range(self.args.sweep_seeds)]
        for spec in self.args.optimizers:
            grid = learning_rate(spec, self.args.lr_grid)
            results[spec.name] = {}
            for lr in grid:
                runs = []
                for seed in seeds:
                    path = folder / f"{spec.file_stem}_lr{lr:g}_seed{seed}.json"
                    runs.append(
                        self.run(spec, seed, lr, path, f"sweep {spec.name} lr {lr:g} seed {seed}")
                    )
                results[spec.name][lr] = runs
            selections[spec.name] = stats.select_lr(
                results[spec.name], self.args.select_metric, self.args.select_target
            )
        return results, selections

    def final(self, lrs: dict[str, float]) -> list[dict]:
        """The final runs, seed-major (an interrupted comparison keeps whole optimizer sets per
        seed), at ``lrs[name]``."""
        folder = self.output / "runs"
        folder.mkdir(parents=True, exist_ok=True)
        runs = []
        total = len(self.args.optimizers) * len(self.args.seeds)
        for seed in self.args.seeds:
            for spec in self.args.optimizers:
                path = folder / f"{spec.file_stem}_seed{seed}.json"
                label = f"[{len(runs) + 1}/{total}] {spec.name} seed {seed}"
                runs.append(self.run(spec, seed, lrs[spec.name], path, label))
                if self.on_run is not None:
                    self.on_run(runs)
        return runs
