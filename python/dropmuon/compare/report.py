"""The comparison's outputs: runs.csv, summary.md and the plots, from the finished runs."""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

BASELINE = "muon"
PHASES = ("forward", "backward", "optimizer")


def write_all(output: Path, runs: list[dict], meta: dict) -> None:
    write_csv(output / "runs.csv", runs)
    (output / "summary.md").write_text(summary(runs, meta))
    plot_accuracy(
        output,
        runs,
        x_key="train_time",
        x_label="training wall-clock (s)",
        name="accuracy_vs_time.png",
    )
    plot_accuracy(output, runs, x_key="epoch", x_label="epoch", name="accuracy_vs_epoch.png")
    plot_breakdown(output / "time_breakdown.png", runs)


def write_csv(path: Path, runs: list[dict]) -> None:
    fields = [
        "optimizer",
        "seed",
        "epoch",
        "step",
        "train_time",
        "train_loss",
        "train_acc",
        "test_acc",
        *(f"{p}_time" for p in PHASES),
    ]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for run in runs:
            for record in run["epochs"]:
                writer.writerow(
                    {
                        "optimizer": run["optimizer"],
                        "seed": run["seed"],
                        **{k: record[k] for k in fields[2:]},
                    }
                )
    tmp.replace(path)


def by_optimizer(runs: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for run in runs:
        groups[run["optimizer"]].append(run)
    return dict(groups)


def time_to(run: dict, metric: str, target: float) -> float | None:
    """Training seconds until the first evaluation at or above the target, or None."""
    for record in run["epochs"]:
        if record[metric] >= target:
            return record["train_time"]
    return None


def spread(values: list[float], digits: int = 1, scale: float = 1.0, unit: str = "") -> str:
    """``mean ± stdev`` of scaled values (the value alone for one, ``-`` for none)."""
    if not values:
        return "-"
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    return f"{statistics.mean(values):.{digits}f}{unit} ± {statistics.stdev(values):.{digits}f}"


def mean_std(values: list[float]) -> str:
    return spread(values)


def pct(values: list[float]) -> str:
    return spread(values, digits=2, scale=100.0)


def summary(runs: list[dict], meta: dict) -> str:
    groups = by_optimizer(runs)
    targets = [("train_acc", t) for t in meta["train_targets"]] + [
        ("test_acc", t) for t in meta["test_targets"]
    ]
    label = lambda metric, t: f"{metric.split('_')[0]} ≥ {t:.2f}"  # noqa: E731
    lines = [
        f"# {meta['dataset']}, {meta['model']}: time to accuracy",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['device']} ({meta['machine']}, {meta['threads']} threads), torch "
        f"{meta['torch']}, dropmuon {meta['dropmuon']}; {meta['train_size']} train / "
        f"{meta['test_size']} test images, batch {meta['batch_size']}, lr {meta['lr']}, "
        f"AdamW lr {meta['adamw_lr']} (non-matrix parameters), momentum {meta['momentum']}, "
        f"weight decay {meta['weight_decay']}, NS iterates {meta['ns_precision']}.",
        "",
        "## Time to target accuracy",
        "",
        "Seconds of training (evaluation excluded), mean ± std over the seeds that reached the "
        "target; (k/n) = seeds that reached it.",
        "",
        "| optimizer | " + " | ".join(label(m, t) for m, t in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for name, group in groups.items():
        cells = []
        for metric, target in targets:
            times = [t for t in (time_to(r, metric, target) for r in group) if t is not None]
            cells.append(f"{mean_std(times)} ({len(times)}/{len(group)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    if BASELINE in groups:
        lines += [
            "",
            f"## Speedup over {BASELINE}",
            "",
            f"{BASELINE}'s time / the optimizer's time to the same target, per seed "
            "(seeds where both reached it), mean ± std; > 1 is faster.",
            "",
            "| optimizer | " + " | ".join(label(m, t) for m, t in targets) + " |",
            "|---|" + "---|" * len(targets),
        ]
        base = {r["seed"]: r for r in groups[BASELINE]}
        for name, group in groups.items():
            if name == BASELINE:
                continue
            cells = []
            for metric, target in targets:
                ratios = []
                for run in group:
                    mine = time_to(run, metric, target)
                    theirs = (
                        time_to(base[run["seed"]], metric, target) if run["seed"] in base else None
                    )
                    if mine and theirs:
                        ratios.append(theirs / mine)
                cells.append(_ratio(ratios))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "## Final accuracy and cost",
        "",
        "| optimizer | epochs | steps | train s | s/step | forward / backward / optimizer "
        "s/step | train acc % | test acc % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, group in groups.items():
        finals = [r["epochs"][-1] for r in group]
        steps = [f["step"] for f in finals]
        per_step = [f["train_time"] / f["step"] for f in finals]
        split = " / ".join(
            f"{statistics.mean(f[f'{p}_time'] / f['step'] for f in finals):.3f}" for p in PHASES
        )
        lines.append(
            f"| {name} | {statistics.mean(f['epoch'] for f in finals):.1f} | "
            f"{statistics.mean(steps):.0f} | {mean_std([f['train_time'] for f in finals])} | "
            f"{statistics.mean(per_step):.3f} | {split} | "
            f"{pct([f['train_acc'] for f in finals])} | {pct([f['test_acc'] for f in finals])} |"
        )
    lines += ["", "## Where Drop-Muon loses", "", *losses(groups, targets), ""]
    return "\n".join(lines)


def _ratio(ratios: list[float]) -> str:
    return spread(ratios, digits=2, unit="x")


def losses(groups: dict[str, list[dict]], targets) -> list[str]:
    """Plain sentences, from the numbers, on each Drop-Muon variant against Muon."""
    if BASELINE not in groups:
        return ["(no muon runs to compare with)"]
    sentences = []
    base = groups[BASELINE]
    base_step = statistics.mean(
        r["epochs"][-1]["train_time"] / r["epochs"][-1]["step"] for r in base
    )
    for name, group in groups.items():
        if not name.startswith("dropmuon"):
            continue
        step = statistics.mean(
            r["epochs"][-1]["train_time"] / r["epochs"][-1]["step"] for r in group
        )
        found = [
            f"- **{name}**: a step costs {step:.3f} s vs {base_step:.3f} s for Muon "
            f"({100 * (1 - step / base_step):+.0f}% saved per step)."
        ]
        gap = _epoch_gap(group, base, "test_acc")
        if gap is not None and gap[0] > 0:
            found.append(
                f"  Per epoch it trails Muon by up to {100 * gap[0]:.2f} points of "
                f"test accuracy (epoch {gap[1]}): each iteration makes less progress."
            )
        for metric, target in targets:
            mine = [time_to(r, metric, target) for r in group]
            theirs = [time_to(r, metric, target) for r in base]
            if sum(t is not None for t in theirs) > sum(t is not None for t in mine):
                found.append(
                    f"  It reaches {metric.split('_')[0]} ≥ {target:.2f} in fewer seeds than Muon."
                )
            else:
                mine_t = [t for t in mine if t is not None]
                theirs_t = [t for t in theirs if t is not None]
                if mine_t and theirs_t and statistics.mean(mine_t) > statistics.mean(theirs_t):
                    found.append(
                        f"  It is slower to {metric.split('_')[0]} ≥ {target:.2f}: "
                        f"{statistics.mean(mine_t):.2f} s vs "
                        f"{statistics.mean(theirs_t):.2f} s."
                    )
        for metric in ("train_acc", "test_acc"):
            mine = statistics.mean(r["epochs"][-1][metric] for r in group)
            theirs = statistics.mean(r["epochs"][-1][metric] for r in base)
            if mine < theirs:
                found.append(
                    f"  Its final {metric.split('_')[0]} accuracy is lower: "
                    f"{100 * mine:.2f}% vs {100 * theirs:.2f}%."
                )
        if len(found) == 1:
            found.append("  It loses to Muon on none of the measures above.")
        sentences += found
    return sentences or ["(no dropmuon runs)"]


def _epoch_gap(group, base, metric):
    """(largest mean shortfall against the baseline at equal epochs, that epoch) or None."""
    epochs = min(min(len(r["epochs"]) for r in group), min(len(r["epochs"]) for r in base))
    if epochs == 0:
        return None
    gaps = []
    for e in range(epochs):
        mine = statistics.mean(r["epochs"][e][metric] for r in group)
        theirs = statistics.mean(r["epochs"][e][metric] for r in base)
        gaps.append((theirs - mine, e + 1))
    return max(gaps)


def _curves(group: list[dict], x_key: str, metric: str):
    epochs = min(len(r["epochs"]) for r in group)
    xs, means, lows, highs = [], [], [], []
    for e in range(epochs):
        values = [r["epochs"][e][metric] for r in group]
        xs.append(statistics.mean(r["epochs"][e][x_key] for r in group))
        means.append(statistics.mean(values))
        lows.append(min(values))
        highs.append(max(values))
    return xs, means, lows, highs


def plot_accuracy(output: Path, runs: list[dict], x_key: str, x_label: str, name: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for optimizer, group in by_optimizer(runs).items():
        for ax, metric in zip(axes, ("train_acc", "test_acc")):
            xs, means, lows, highs = _curves(group, x_key, metric)
            (line,) = ax.plot(xs, means, marker="o", markersize=3, label=optimizer)
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2)
    for ax, title in zip(axes, ("train accuracy", "test accuracy")):
        ax.set_title(f"{title} (mean, min-max over seeds)")
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(output / name, dpi=110)
    plt.close(fig)


def plot_breakdown(path: Path, runs: list[dict]) -> None:
    groups = by_optimizer(runs)
    names = list(groups)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 4))
    bottom = [0.0] * len(names)
    for phase in PHASES:
        heights = [
            statistics.mean(
                r["epochs"][-1][f"{phase}_time"] / r["epochs"][-1]["step"] for r in groups[n]
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
