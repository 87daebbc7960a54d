"""The comparison's plots: the main metric against training time and against epochs (mean and
min-max over seeds), where a step's time goes, and with ``--log-smoothness`` each optimizer's
per-layer smoothness estimates over training."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .report import PHASES, SPLITS, by_optimizer, main_metric, metric_fields  # noqa: E402
from .stats import records  # noqa: E402

# ----------------------------------------------------------------------------------------------


def _curves(group: list[dict], x_key: str, metric: str):
    count = min(len(records(r)) for r in group)
    xs, means, lows, highs = [], [], [], []
    for e in range(count):
        values = [records(r)[e][metric] for r in group if metric in records(r)[e]]
        if not values:
            continue
        xs.append(statistics.mean(records(r)[e][x_key] for r in group))
        means.append(statistics.mean(values))
        lows.append(min(values))
        highs.append(max(values))
    return xs, means, lows, highs


def plot_curves(path: Path, runs: list[dict], meta: dict, x_key: str, x_label: str) -> None:
    kind = main_metric(meta)
    metrics = [m for m in (f"{s}_{kind}" for s in SPLITS) if m in metric_fields(runs)]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(5.5 * len(metrics), 4), sharex=True, squeeze=False
    )
    for optimizer, group in by_optimizer(runs).items():
        for ax, metric in zip(axes[0], metrics):
            xs, means, lows, highs = _curves(group, x_key, metric)
            (line,) = ax.plot(xs, means, marker="o", markersize=2, label=optimizer)
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2)
    for ax, metric in zip(axes[0], metrics):
        ax.set_title(f"{metric.replace('_', ' ')} (mean, min-max over seeds)")
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # fmt: skip


def plot_breakdown(path: Path, runs: list[dict]) -> None:
    groups = by_optimizer(runs)
    names = list(groups)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 4))
    bottom = [0.0] * len(names)
    for phase in PHASES:
        heights = [
            statistics.mean(
                records(r)[-1][f"{phase}_time"] / max(records(r)[-1]["step"], 1) for r in groups[n]
            )
            for n in names
        ]
        ax.bar(names, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("seconds per step (mean over seeds)")
    ax.set_title("where a training step's time goes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_smoothness(path: Path, runs: list[dict]) -> None:
    """Each Drop-Muon/Muon optimizer's per-layer estimates over training (its first seed)."""
    groups = {
        n: g for n, g in by_optimizer(runs).items() if any("smoothness" in r for r in records(g[0]))
    }
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (name, group) in zip(axes[0], groups.items()):
        run = group[0]
        steps = [r["step"] for r in records(run)]
        layers = len(records(run)[-1]["smoothness"])
        names = run.get("layer_names") or [str(i) for i in range(layers)]
        for layer in range(layers):
            values = [
                r["smoothness"][layer] if r["smoothness"][layer] is not None else math.nan
                for r in records(run)
            ]
            ax.plot(steps, values, label=names[layer])
        ax.set_yscale("log")
        ax.set_title(f"{name}, seed {run['seed']}: smoothness estimate per layer")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if layers <= 12:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # fmt: skip
