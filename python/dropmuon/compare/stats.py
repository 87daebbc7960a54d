"""The statistics of a comparison: time to a target, paired speedups with bootstrap confidence
intervals, and the learning-rate selection of a sweep. Plain Python and torch (no numpy)."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

BOOTSTRAP_RESAMPLES = 10000
CONFIDENCE = 0.95


def records(run: dict) -> list[dict]:
    """A run's evaluations (``evals``; ``epochs`` in runs written before evaluations could come
    every N steps)."""
    return run.get("evals") or run.get("epochs") or []


def reaches(metric: str, value: float, target: float) -> bool:
    """Accuracy targets are reached from below, loss targets from above."""
    return value <= target if metric.endswith("_loss") else value >= target


def time_to(run: dict, metric: str, target: float) -> float | None:
    """Training seconds at the first evaluation that reached the target, or None."""
    for record in records(run):
        if metric in record and reaches(metric, record[metric], target):
            return record["train_time"]
    return None


def steps_to(run: dict, metric: str, target: float) -> int | None:
    """Optimizer steps at the first evaluation that reached the target, or None."""
    for record in records(run):
        if metric in record and reaches(metric, record[metric], target):
            return record["step"]
    return None


@dataclass
class Interval:
    """A point estimate with its confidence interval (``n`` pairs behind it)."""

    estimate: float
    low: float
    high: float
    n: int

    @property
    def established(self) -> bool:
        """The interval lies on one side of 1 (a ratio that is really not 1)."""
        return self.low > 1.0 or self.high < 1.0


def bootstrap_geometric_mean(
    ratios: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> Interval | None:
    """The geometric mean of positive ratios with a percentile-bootstrap 95% interval (the
    per-seed ratios resampled with replacement, ``resamples`` times, from a fixed seed). None
    for fewer than 2 ratios: no interval can be had from one."""
    if len(ratios) < 2:
        return None
    logs = [math.log(r) for r in ratios]
    rng = random.Random(seed)
    n = len(logs)
    means = sorted(sum(rng.choices(logs, k=n)) / n for _ in range(resamples))
    tail = (1 - CONFIDENCE) / 2
    low = means[int(math.floor(tail * (resamples - 1)))]
    high = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return Interval(math.exp(statistics.mean(logs)), math.exp(low), math.exp(high), n)


def paired_speedups(runs: list[dict], baselines: list[dict], metric: str, target: float):
    """Per seed, the baseline's time to the target over the run's (> 1: faster), for the seeds
    where both reached it; and how many seeds were paired at all."""
    base = {r["seed"]: r for r in baselines}
    ratios = []
    for run in runs:
        other = base.get(run["seed"])
        if other is None:
            continue
        mine, theirs = time_to(run, metric, target), time_to(other, metric, target)
        if mine and theirs:
            ratios.append(theirs / mine)
    return ratios


# ----------------------------------------------------------------------------------------------
# Learning-rate selection
# ----------------------------------------------------------------------------------------------


@dataclass
class Selection:
    lr: float
    criterion: str  # what decided, in words
    at_edge: bool  # the chosen value is the grid's smallest or largest


def select_lr(by_lr: dict[float, list[dict]], metric: str, target: float | None) -> Selection:
    """The grid value whose runs (on the validation split) are best: the shortest median time
    to ``target`` on ``metric`` (a run that never reaches it counts as infinitely slow), and
    where no value reaches it in most runs, the best mean final value of ``metric``."""
    grid = sorted(by_lr)
    edge = lambda lr: len(grid) > 1 and lr in (grid[0], grid[-1])  # noqa: E731
    if target is not None:
        medians = {
            lr: statistics.median(
                t if t is not None else math.inf for t in (time_to(r, metric, target) for r in runs)
            )
            for lr, runs in by_lr.items()
        }
        best = min(grid, key=lambda lr: (medians[lr], lr))
        if math.isfinite(medians[best]):
            return Selection(
                best,
                f"median time to {metric} {'≤' if metric.endswith('_loss') else '≥'} {target}",
                edge(best),
            )
    sign = 1.0 if metric.endswith("_loss") else -1.0
    finals = {
        lr: statistics.mean(records(r)[-1][metric] for r in runs) for lr, runs in by_lr.items()
    }
    best = min(grid, key=lambda lr: (sign * finals[lr], lr))
    return Selection(best, f"best mean final {metric}", edge(best))
