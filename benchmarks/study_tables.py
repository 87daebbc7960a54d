"""The study's cross-setting tables (benchmarks/RESULTS.md section 3), from the result folders
that benchmarks/run_study.sh writes: the headline (selected lr, time to each validation target
with a 95% interval, paired speedup over Muon, final test metric), the sweep curves (final
validation metric per lr, with a plot), the per-step cost split and progress per step, and the
smoothness estimates with the cost-optimal distribution they imply.

    python3 benchmarks/study_tables.py [benchmarks/results/study] > tables.md
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from dropmuon.compare.stats import (
    bootstrap_geometric_mean,
    paired_speedups,
    records,
    steps_to,
    time_to,
)

SETTINGS = (
    "fashion-mnist-paper-cnn",
    "mnist-paper-cnn",
    "fashion-mnist-resnet18",
    "fashion-mnist-vit",
    "fortunes-gpt",
)
BASELINE = "muon"


def load(folder: Path) -> dict[str, list[dict]]:
    runs = defaultdict(list)
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        runs[run["optimizer"]].append(run)
    return dict(runs)


def finished(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.json"))


def metric_of(meta: dict) -> str:
    return "val_acc" if meta["task"] == "classification" else "val_loss"


def val_targets(meta: dict) -> list[float]:
    metric = metric_of(meta)
    return [target for name, target in meta["targets"] if name == metric]


def mean_interval(values: list[float]) -> str:
    """Geometric mean of positive times with its percentile-bootstrap 95% interval."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    interval = bootstrap_geometric_mean(values)
    return f"{interval.estimate:.1f} [{interval.low:.1f}, {interval.high:.1f}]"


def speedup(runs, baseline, metric, target) -> str:
    ratios = paired_speedups(runs, baseline, metric, target)
    interval = bootstrap_geometric_mean(ratios)
    if interval is None:
        return f"- (n={len(ratios)})"
    verdict = "" if interval.established else ", n.e."
    return f"{interval.estimate:.2f}x [{interval.low:.2f}, {interval.high:.2f}]{verdict}"


def final(runs: list[dict], metric: str) -> str:
    values = [records(r)[-1][metric] for r in runs]
    scale, digits = (1.0, 3) if metric.endswith("_loss") else (100.0, 1)
    mean = statistics.mean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def settings_with_runs(root: Path):
    """(setting, runs by optimizer, meta, validation metric) of each finished setting."""
    for setting in SETTINGS:
        folder = root / setting / "runs"
        if finished(folder):
            groups = load(folder)
            meta = next(iter(groups.values()))[0]["meta"]
            yield setting, groups, meta, metric_of(meta)


def target_cells(name: str, runs: list[dict], groups: dict, metric: str, target: float) -> list:
    """Time to the target (k/n seeds) and the paired speedup over Muon."""
    times = [s for s in (time_to(r, metric, target) for r in runs) if s is not None]
    return [
        f"{mean_interval(times)} ({len(times)}/{len(runs)})",
        "—" if name == BASELINE else speedup(runs, groups.get(BASELINE, []), metric, target),
    ]


def combined(root: Path) -> list[str]:
    """One table, model x optimizer: the selection target and the hardest validation target."""
    lines = [
        "## Headline (all settings)",
        "",
        "Validation targets: the lr-selection target and the hardest one. Seconds of training: "
        "geometric mean [95% bootstrap interval] (k/n seeds that reached it); speedup: paired "
        "per seed over Muon, geometric mean [95% interval], n.e. = not established.",
        "",
        "| setting | optimizer | lr | selection target: s (k/n) | speedup | hardest target: "
        "s (k/n) | speedup | final test metric |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting, groups, meta, metric in settings_with_runs(root):
        sign = "≤" if metric.endswith("_loss") else "≥"
        targets = [meta["select_target"], val_targets(meta)[-1]]
        test = metric.replace("val_", "test_")
        for i, (name, runs) in enumerate(sorted(groups.items(), key=lambda kv: kv[0] != BASELINE)):
            cells = [f"{setting} ({metric} {sign} {targets[0]} / {targets[1]})" if i == 0 else ""]
            cells += [name, f"{runs[0]['lr']:g}"]
            for t in targets:
                cells += target_cells(name, runs, groups, metric, t)
            cells.append(final(runs, test))
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def headline(root: Path) -> list[str]:
    lines = ["## Per setting, every validation target", ""]
    for setting, groups, meta, metric in settings_with_runs(root):
        targets = val_targets(meta)
        test = metric.replace("val_", "test_")
        sign = "≤" if metric.endswith("_loss") else "≥"
        lines += [
            f"### {setting}",
            "",
            f"Seconds of training to {metric} {sign} target: geometric mean [95% bootstrap "
            "interval] over the seeds that reached it (k/n); speedup: paired per seed over "
            "Muon, geometric mean [95% interval], n.e. = not established (the interval "
            "contains 1).",
            "",
            "| optimizer | lr | "
            + " | ".join(f"{sign} {t}: s (k/n) | speedup" for t in targets)
            + f" | final {test} |",
            "|---|---|" + "---|---|" * len(targets) + "---|",
        ]
        for name, runs in groups.items():
            cells = [name, f"{runs[0]['lr']:g}"]
            for t in targets:
                cells += target_cells(name, runs, groups, metric, t)
            cells.append(final(runs, test))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def sweep_curves(root: Path) -> tuple[list[str], dict]:
    lines = [
        "## Sweep curves (validation split, sweep seeds)",
        "",
        "Mean final validation metric per lr; **bold** = selected (by median time to the "
        "selection target, else best final value); * = at the grid's edge.",
        "",
    ]
    curves = {}
    for setting in SETTINGS:
        folder = root / setting / "sweep"
        if not finished(folder) or not finished(root / setting / "runs"):
            continue
        groups = load(folder)
        chosen = {name: runs[0]["lr"] for name, runs in load(root / setting / "runs").items()}
        meta = next(iter(groups.values()))[0]["meta"]
        metric = metric_of(meta)
        lrs_all = sorted(
            {r["lr"] for runs in groups.values() for r in runs if r["optimizer"] != "adamw"}
        )
        lines += [f"### {setting} ({metric})", "", "| optimizer | " + " | ".join(
            f"lr {lr:g}" for lr in lrs_all) + " |", "|---|" + "---|" * len(lrs_all)]  # fmt: skip
        curves[setting] = {}
        for name, runs in groups.items():
            by_lr = defaultdict(list)
            for r in runs:
                by_lr[r["lr"]].append(records(r)[-1][metric])
            grid = sorted(by_lr)
            curves[setting][name] = (grid, [statistics.mean(by_lr[lr]) for lr in grid])
            if name == "adamw":
                cells = [f"{lr:g}: {statistics.mean(by_lr[lr]):.4f}" for lr in grid]
                marked = [f"**{c}**" if lr == chosen.get(name) else c for c, lr in zip(cells, grid)]
                lines.append(
                    f"| adamw (own grid) | {'; '.join(marked)} |" + " |" * (len(lrs_all) - 1)
                )
                continue
            cells = []
            for lr in lrs_all:
                if lr not in by_lr:
                    cells.append("-")
                    continue
                text = f"{statistics.mean(by_lr[lr]):.4f}"
                if lr == chosen.get(name):
                    text = f"**{text}**" + ("*" if lr in (grid[0], grid[-1]) else "")
                cells.append(text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines, curves


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (setting, by_name) in zip(axes[0], curves.items()):
        for name, (grid, values) in by_name.items():
            if name != "adamw":
                ax.plot(grid, values, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("lr")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final validation metric")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cost_split(root: Path) -> list[str]:
    lines = [
        "## Per-step cost and progress per step",
        "",
        "Seconds per optimizer step (mean over the final runs), split into forward / backward / "
        "optimizer; step ratio = the optimizer's step time over Muon's; steps ratio = its median "
        "steps to the selection target over Muon's (> 1: less progress per step); time ratio = "
        "the product, what the wall clock sees.",
        "",
        "| setting | optimizer | s/step | forward / backward / optimizer | step ratio | "
        "steps to target (median) | steps ratio | time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting, groups, meta, metric in settings_with_runs(root):
        target = meta["select_target"]

        def per_step(runs, key):
            return statistics.mean(records(r)[-1][key] / records(r)[-1]["step"] for r in runs)

        def median_steps(runs, metric=metric, target=target):
            steps = [steps_to(r, metric, target) for r in runs]
            steps = [s if s is not None else math.inf for s in steps]
            return statistics.median(steps)

        base = groups[BASELINE]
        base_step, base_steps = per_step(base, "train_time"), median_steps(base)
        for name, runs in groups.items():
            step = per_step(runs, "train_time")
            parts = " / ".join(
                f"{per_step(runs, k):.3f}"
                for k in ("forward_time", "backward_time", "optimizer_time")
            )
            steps = median_steps(runs)
            ratio = steps / base_steps if math.isfinite(steps) else math.inf
            lines.append(
                f"| {setting} | {name} | {step:.3f} | {parts} | {step / base_step:.2f} | "
                f"{steps:g} | {ratio:.2f} | {ratio * step / base_step:.2f} |"
            )
    return lines + [""]


def smoothness(root: Path) -> list[str]:
    lines = [
        "## Per-layer smoothness (Muon, every layer estimated at every step)",
        "",
        "L_i at the first, middle and last evaluation; full updates are cost-optimal only if "
        "layer 0's is the largest (docs/method.md section 3). P(cutoff) = the cost-optimal "
        "distribution at the last evaluation, from the running maxima R_i: (R_i - R_{i-1}) / "
        "R_last.",
        "",
    ]
    for setting in SETTINGS:
        folder = root / "smoothness" / setting / "runs"
        if not finished(folder):
            continue
        for name, runs in load(folder).items():
            evals = [
                e for e in records(runs[0]) if e.get("smoothness") and None not in e["smoothness"]
            ]
            if not evals:
                continue
            picks = {"first": evals[0], "middle": evals[len(evals) // 2], "last": evals[-1]}
            lines.append(f"- **{setting}** ({name}, {len(evals[0]['smoothness'])} layers):")
            for label, e in picks.items():
                values = e["smoothness"]
                top = values.index(max(values))
                lines.append(
                    f"  - {label} (step {e['step']}): largest at layer {top} of "
                    f"{len(values)}; L = [{', '.join(f'{v:.3g}' for v in values)}]"
                )
            values = evals[-1]["smoothness"]
            running, previous, p = 0.0, 0.0, []
            for v in values:
                running = max(running, v)
                p.append((running - previous) / max(values))
                previous = running
            active = [sum(p[: i + 1]) for i in range(len(p))]
            verdict = "holds" if values.index(max(values)) == 0 else "fails"
            lines.append(
                f"  - cost-optimal P(cutoff) = [{', '.join(f'{v:.2f}' for v in p)}]: layer i is "
                f"updated with probability [{', '.join(f'{v:.2f}' for v in active)}]; the "
                f"condition for full updates {verdict}"
            )
    return lines + [""]


def main(root: Path) -> None:
    lines = [f"# Study tables (from {root})", ""]
    lines += combined(root)
    lines += headline(root)
    sweep_lines, curves = sweep_curves(root)
    lines += sweep_lines
    if curves:
        plot_curves(curves, root / "sweep_curves.png")
        lines += [f"![sweep curves]({root.name}/sweep_curves.png)", ""]
    lines += cost_split(root)
    lines += smoothness(root)
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/study"))
