"""The comparison's outputs, from the finished runs: runs.csv, sweep.csv, summary.md, and the
plots of :mod:`dropmuon.compare.plots`."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .stats import (
    bootstrap_geometric_mean,
    paired_speedups,
    records,
    steps_to,
    time_to,
)

# What speedups are measured against, where present (adamw: for Drop-AdamW).
BASELINES = ("muon", "torch-muon", "adamw")
PHASES = ("forward", "backward", "optimizer")
SPLITS = ("train", "val", "test")


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


def by_optimizer(runs: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for run in runs:
        groups[run["optimizer"]].append(run)
    return dict(groups)


def metric_label(metric: str, target: float) -> str:
    split, kind = metric.split("_")
    return f"{split} {'loss ≤' if kind == 'loss' else '≥'} {target:g}"


def main_metric(meta: dict) -> str:
    return "loss" if meta.get("task") == "language-model" else "acc"


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def write_all(output: Path, runs: list[dict], meta: dict, sweep=None, selections=None) -> None:
    from .plots import plot_breakdown, plot_curves, plot_smoothness

    write_csv(output / "runs.csv", runs)
    (output / "summary.md").write_text(summary(runs, meta, sweep, selections))
    name = "accuracy" if main_metric(meta) == "acc" else "loss"
    plot_curves(output / f"{name}_vs_time.png", runs, meta, "train_time", "training wall-clock (s)")
    plot_curves(output / f"{name}_vs_epoch.png", runs, meta, "epoch", "epoch")
    plot_breakdown(output / "time_breakdown.png", runs)
    if any("smoothness" in r for run in runs for r in records(run)):
        plot_smoothness(output / "smoothness.png", runs)


def metric_fields(runs: list[dict]) -> list[str]:
    found = {k for run in runs for r in records(run) for k in r if k.split("_")[0] in SPLITS}
    return [f"{s}_{m}" for s in SPLITS for m in ("acc", "loss") if f"{s}_{m}" in found]


def write_csv(path: Path, runs: list[dict]) -> None:
    fields = ["optimizer", "seed", "lr", "epoch", "step", "train_time", "running_loss"]
    fields += metric_fields(runs) + [f"{p}_time" for p in PHASES]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for run in runs:
            for record in records(run):
                writer.writerow(
                    {
                        "optimizer": run["optimizer"],
                        "seed": run["seed"],
                        "lr": run.get("lr"),
                        **record,
                    }
                )
    tmp.replace(path)


def write_sweep_csv(path: Path, sweep: dict, selections: dict, meta: dict) -> None:
    metric, target = selections_metric(meta)
    fields = ["optimizer", "lr", "seed", "selected", f"time_to_{metric}", f"final_{metric}"]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for name, by_lr in sweep.items():
            for lr, runs in sorted(by_lr.items()):
                for run in runs:
                    reached = time_to(run, metric, target) if target is not None else None
                    writer.writerow(
                        [name, lr, run["seed"], lr == selections[name].lr, reached,
                         records(run)[-1].get(metric)]
                    )  # fmt: skip
    tmp.replace(path)


def selections_metric(meta: dict) -> tuple[str, float | None]:
    return ("val_loss" if main_metric(meta) == "loss" else "val_acc"), meta.get("select_target")


# ----------------------------------------------------------------------------------------------
# summary.md
# ----------------------------------------------------------------------------------------------


def summary(runs: list[dict], meta: dict, sweep=None, selections=None) -> str:
    groups = by_optimizer(runs)
    targets = [tuple(t) for t in meta["targets"]]
    every = meta.get("eval_every_steps")
    lines = [
        f"# {meta['dataset']}, {meta['model']}: time to target",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['device']} ({meta['machine']}, {meta['threads']} threads), torch "
        f"{meta['torch']}, dropmuon {meta['dropmuon']}; {meta['train_size']} train / "
        f"{meta.get('val_size', 0)} validation / {meta['test_size']} test samples, batch "
        f"{meta['batch_size']}, AdamW lr {meta['adamw_lr']} (non-matrix parameters), momentum "
        f"{meta['momentum']}, weight decay {meta['weight_decay']}, NS iterates "
        f"{meta['ns_precision']}. Evaluated "
        + (f"every {every} steps" if every else "at every epoch's end")
        + " and at the end; evaluation is not on the clock.",
        "",
    ]
    if sweep:
        lines += sweep_section(sweep, selections, meta)
    lines += [
        "## Learning rates of the final runs",
        "",
        ", ".join(f"{name}: {group[0].get('lr')}" for name, group in groups.items()),
        "",
        *pairing_section(groups),
        "## Time to target",
        "",
        "Seconds of training, mean ± std over the seeds that reached the target, and optimizer "
        "steps (median); (k/n) = seeds that reached it"
        + (f"; resolved to {every} steps." if every else "; resolved to an epoch."),
        "",
        "| optimizer | " + " | ".join(metric_label(m, t) for m, t in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for name, group in groups.items():
        cells = []
        for metric, target in targets:
            times = [t for t in (time_to(r, metric, target) for r in group) if t is not None]
            steps = [s for s in (steps_to(r, metric, target) for r in group) if s is not None]
            step_text = f", {statistics.median(steps):.0f} steps" if steps else ""
            cells.append(f"{mean_std(times)}{step_text} ({len(times)}/{len(group)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for baseline in (b for b in BASELINES if b in groups):
        lines += speedup_section(groups, baseline, targets)
    lines += final_section(groups, meta)
    if any("smoothness" in r for run in runs for r in records(run)):
        lines += smoothness_section(groups)
    lines += ["## Where Drop-Muon loses", "", *losses(groups, targets, meta), ""]
    return "\n".join(lines)


def sweep_section(sweep, selections, meta) -> list[str]:
    metric, target = selections_metric(meta)
    label = metric_label(metric, target) if target is not None else None
    lines = [
        "## Learning-rate sweep (on the validation split)",
        "",
        f"Each grid value on {meta.get('sweep_seeds')} sweep seeds (1000, 1001, ...; not the "
        "final seeds). Cells: "
        + (f"median seconds to {label} (k/n reached), then " if label else "")
        + f"mean final {metric}. **Bold**: chosen.",
        "",
        "| optimizer | lr | " + (f"to {label} | " if label else "") + f"final {metric} |",
        "|---|---|" + ("---|" if label else "") + "---|",
    ]
    for name, by_lr in sweep.items():
        for lr, runs in sorted(by_lr.items()):
            chosen = lr == selections[name].lr
            cells = [f"**{lr:g}**" if chosen else f"{lr:g}"]
            if label:
                times = [time_to(r, metric, target) for r in runs]
                reached = [t for t in times if t is not None]
                median = statistics.median(t if t is not None else math.inf for t in times)
                cells.append(f"{median:.1f} ({len(reached)}/{len(runs)})")
            cells.append(f"{statistics.mean(records(r)[-1][metric] for r in runs):.4f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Chosen:"]
    for name, selection in selections.items():
        edge = (
            " — **at the grid's edge**: the best value may lie outside it"
            if selection.at_edge
            else ""
        )
        lines.append(f"- {name}: lr {selection.lr:g}, by {selection.criterion}{edge}.")
    return lines + [""]


def pairing_section(groups) -> list[str]:
    """Whether each seed gave every optimizer the same initial weights and batch order."""
    seeds = defaultdict(set)
    for group in groups.values():
        for run in group:
            if "init_fingerprint" in run:
                seeds[run["seed"]].add((run["init_fingerprint"], run["order_fingerprint"]))
    if not seeds:
        return []
    broken = sorted(seed for seed, prints in seeds.items() if len(prints) > 1)
    text = (
        "Paired seeds: for every seed, every optimizer started from the same weights and saw "
        "the same batches (fingerprints match)."
        if not broken
        else f"**Pairing broken** for seeds {broken}: their optimizers did not share initial "
        "weights or batch order, so their speedups are not paired."
    )
    return [text, ""]


def speedup_section(groups, baseline: str, targets) -> list[str]:
    lines = [
        "",
        f"## Speedup over {baseline}",
        "",
        f"Per seed, {baseline}'s time over the optimizer's to the same target (seeds where "
        "both reached it; > 1 is faster): geometric mean [95% bootstrap interval] (n pairs). "
        '"not established": the interval contains 1.',
        "",
        "| optimizer | " + " | ".join(metric_label(m, t) for m, t in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for name, group in groups.items():
        if name == baseline:
            continue
        cells = []
        for metric, target in targets:
            ratios = paired_speedups(group, groups[baseline], metric, target)
            interval = bootstrap_geometric_mean(ratios)
            if interval is None:
                cells.append(f"{ratios[0]:.2f}x (n=1)" if ratios else "-")
                continue
            verdict = "" if interval.established else ", not established"
            cells.append(
                f"{interval.estimate:.2f}x [{interval.low:.2f}, {interval.high:.2f}] "
                f"(n={interval.n}{verdict})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def final_section(groups, meta) -> list[str]:
    kind = main_metric(meta)
    metrics = [
        f"{s}_{kind}"
        for s in SPLITS
        if any(f"{s}_{kind}" in records(r)[-1] for g in groups.values() for r in g)
    ]
    show = (lambda v: pct(v)) if kind == "acc" else (lambda v: spread(v, digits=4))  # noqa: E731
    header = " | ".join(
        f"{m.split('_')[0]} {'acc %' if kind == 'acc' else 'loss'}" for m in metrics
    )
    lines = [
        "## Final metrics and cost",
        "",
        "| optimizer | epochs | steps | train s | s/step | forward / backward / optimizer "
        f"s/step | {header} |",
        "|---|---|---|---|---|---|" + "---|" * len(metrics),
    ]  # fmt: skip
    for name, group in groups.items():
        finals = [records(r)[-1] for r in group]
        steps = [f["step"] for f in finals]
        per_step = [f["train_time"] / max(f["step"], 1) for f in finals]
        split = " / ".join(
            f"{statistics.mean(f[f'{p}_time'] / max(f['step'], 1) for f in finals):.3f}"
            for p in PHASES
        )
        values = " | ".join(show([f[m] for f in finals if m in f]) for m in metrics)
        lines.append(
            f"| {name} | {statistics.mean(f['epoch'] for f in finals):.1f} | "
            f"{statistics.mean(steps):.0f} | {mean_std([f['train_time'] for f in finals])} | "
            f"{statistics.mean(per_step):.3f} | {split} | {values} |"
        )
    if kind == "loss":
        lines += [
            "",
            "Per-character perplexity = exp(loss): "
            + "; ".join(
                f"{name} {math.exp(mean_final(group, 'test_loss')):.2f}"
                for name, group in groups.items()
            )
            + " (test).",
        ]
    return lines + [""]


def mean_final(group: list[dict], metric: str) -> float:
    return statistics.mean(records(r)[-1][metric] for r in group)


def smoothness_section(groups) -> list[str]:
    """The last estimates per layer (mean over seeds) and what they imply (docs/method.md
    section 3): full updates are cost-optimal only if the first layer's is the largest."""
    lines = [
        "## Per-layer smoothness estimates (last evaluation, mean over seeds)",
        "",
        "Full updates are cost-optimal only if layer 0 has the largest estimate "
        "(docs/method.md section 3); the cost-optimal P(cutoff) follows from the running maxima.",
        "",
    ]
    for name, group in groups.items():
        last = [records(r)[-1].get("smoothness") for r in group]
        last = [s for s in last if s and all(v is not None for v in s)]
        if not last:
            continue
        means = [statistics.mean(s[i] for s in last) for i in range(len(last[0]))]
        running, p, previous = 0.0, [], 0.0
        for v in means:
            running = max(running, v)
            p.append((running - previous) / max(means))
            previous = running
        top = means.index(max(means))
        lines.append(
            f"- {name}: L = [{', '.join(f'{v:.3g}' for v in means)}]; largest at layer {top}"
            + (
                " (the condition for full updates holds)"
                if top == 0
                else " (full updates are not cost-optimal)"
            )
            + f"; cost-optimal P(cutoff) = [{', '.join(f'{v:.2f}' for v in p)}]."
        )  # fmt: skip
    return lines + [""]


def losses(groups: dict[str, list[dict]], targets, meta) -> list[str]:
    """Plain sentences, from the numbers, on each Drop-Muon variant against Muon."""
    if "muon" not in groups:
        return ["(no muon runs to compare with)"]
    sentences = []
    base = groups["muon"]

    def per_step(group):
        return statistics.mean(
            records(r)[-1]["train_time"] / max(records(r)[-1]["step"], 1) for r in group
        )

    base_step = per_step(base)
    for name, group in groups.items():
        if not name.startswith("dropmuon"):
            continue
        step = per_step(group)
        found = [
            f"- **{name}**: a step costs {step:.3f} s vs {base_step:.3f} s for Muon "
            f"({100 * (1 - step / base_step):+.0f}% saved per step)."
        ]
        for metric, target in targets:
            ratios = paired_speedups(group, base, metric, target)
            interval = bootstrap_geometric_mean(ratios)
            reached = sum(time_to(r, metric, target) is not None for r in group)
            base_reached = sum(time_to(r, metric, target) is not None for r in base)
            label = metric_label(metric, target)
            if reached < base_reached:
                found.append(
                    f"  It reaches {label} in fewer seeds than Muon ({reached} vs {base_reached})."
                )
            elif interval is not None and interval.high < 1.0:
                found.append(
                    f"  It is slower to {label}: {interval.estimate:.2f}x "
                    f"[{interval.low:.2f}, {interval.high:.2f}]."
                )
        kind = main_metric(meta)
        for split in SPLITS:
            metric = f"{split}_{kind}"
            mine = [records(r)[-1][metric] for r in group if metric in records(r)[-1]]
            theirs = [records(r)[-1][metric] for r in base if metric in records(r)[-1]]
            if not mine or not theirs:
                continue
            worse = (
                statistics.mean(mine) > statistics.mean(theirs)
                if kind == "loss"
                else statistics.mean(mine) < statistics.mean(theirs)
            )
            if worse:
                found.append(
                    f"  Its final {split} "
                    f"{'loss is higher' if kind == 'loss' else 'accuracy is lower'}: "
                    f"{statistics.mean(mine):.4f} vs {statistics.mean(theirs):.4f}."
                )
        if len(found) == 1:
            found.append("  It loses to Muon on none of the measures above.")
        sentences += found
    return sentences or ["(no dropmuon runs)"]  # fmt: skip
