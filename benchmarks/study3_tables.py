"""The third edition's tables (RESULTS.md section 3), from the folders benchmarks/run_study3.py
writes: per setting, every optimizer of its jobs (depth-unit runs marked ``[blocks]``) with its
lr grid and choice, time to the hardest and the middle validation target with 95% intervals,
paired speedups over Muon (and Drop-AdamW over AdamW), final validation and test metrics; the
A/A pair; the sweeps; and how often each layer was updated. ``--results`` prints only the
headline tables as RESULTS.md section 3 shows them (readable names, the lr with its grid).
``--check-target SETTING VALUE`` prints one setting's times to a validation target chosen
after the runs (a check, never a headline: the lrs were chosen for the setting's own targets).

    python3 benchmarks/study3_tables.py [benchmarks/results/study3] > tables.md
    python3 benchmarks/study3_tables.py --results      # the tables to paste into RESULTS.md
    python3 benchmarks/study3_tables.py --check-target resnet18 0.85
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from study_tables import final, finished, load, mean_interval, metric_of, speedup, val_targets

from dropmuon.compare.stats import records, select_lr, steps_to, time_to

SETTINGS = ("vit", "paper-cnn", "gpt", "resnet18")
SUFFIXES = {"": "", "-blocks": " [blocks]", "-blocks-epoch-shift": " [blocks]", "-adamw": "",
            "-baselines": "", "-po-baselines": ""}  # fmt: skip
PAIRS = {"dropadamw:uniform": "adamw"}  # besides Muon, what an optimizer is paired with
TITLES = {"vit": "ViT", "paper-cnn": "Paper CNN", "gpt": "Char GPT", "resnet18": "ResNet-18"}
# RESULTS.md's names and row order; an optimizer not listed keeps its harness name, last.
READABLE = {
    "muon": "Muon",
    "torch-muon": "torch.optim.Muon (A/A)",
    "dropmuon:cost_optimal": "Drop-Muon cost_optimal",
    "dropmuon:cost_optimal [blocks]": "Drop-Muon cost_optimal [blocks]",
    "dropmuon:epoch_shift": "Drop-Muon epoch_shift",
    "dropmuon:epoch_shift [blocks]": "Drop-Muon epoch_shift [blocks]",
    "dropmuon:uniform": "Drop-Muon uniform",
    "dropmuon:uniform [blocks]": "Drop-Muon uniform [blocks]",
    "muon [rerun with blocks]": "Muon, rerun with the [blocks] runs",
    "muon [rerun with blocks-epoch-shift]": "Muon, rerun with epoch_shift [blocks]",
    "muon [rerun with baselines]": "Muon, rerun with the baseline Muons",
    "muon [rerun with po-baselines]": "Muon, rerun with pytorch-optimizer's Muons",
    "kj-muon": "Keller Jordan's Muon",
    "po-muon": "pytorch-optimizer Muon",
    "po-adamuon": "pytorch-optimizer AdaMuon",
    "po-normuon": "pytorch-optimizer NorMuon",
    "muon [rerun with adamw]": "Muon, rerun with AdamW",
    "adamw": "AdamW",
    "dropadamw:uniform": "Drop-AdamW uniform",
}


def gather(root: Path, setting: str):
    """Runs by optimizer over the setting's jobs, each optimizer's lr grid, its sweep runs, the
    Muon runs each optimizer is timed against where not the first job's (``against``: a job's
    own rerun of Muon, in its session), and the meta."""
    groups, grids, sweeps, against, meta = {}, {}, {}, {}, None
    for suffix, mark in SUFFIXES.items():
        folder = root / f"{setting}{suffix}"
        if not finished(folder / "runs"):
            continue
        job_grids = json.loads((folder / "grids.json").read_text())
        runs_by_name, sweep_by_name = load(folder / "runs"), load(folder / "sweep")
        rerun = None
        if suffix and "muon" in runs_by_name:
            rerun = f"muon [rerun with {suffix[1:]}]"
            groups[rerun] = runs_by_name.pop("muon")
            sweeps[rerun] = sweep_by_name.pop("muon", [])
        for name, runs in runs_by_name.items():
            groups[name + mark] = runs
            grids[name + mark] = job_grids.get(name, [])
            meta = meta or runs[0]["meta"]
            if rerun:
                against[name + mark] = rerun
        for name, runs in sweep_by_name.items():
            sweeps[name + mark] = runs
    return groups, grids, sweeps, against, meta


def unpaired(groups: dict) -> list[str]:
    """Optimizers whose seeds did not start from Muon's weights and batches."""
    base = {r["seed"]: r for r in groups.get("muon", [])}
    bad = []
    for name, runs in groups.items():
        for r in runs:
            b = base.get(r["seed"])
            if b and (r["init_fingerprint"], r["order_fingerprint"]) != (
                b["init_fingerprint"], b["order_fingerprint"]
            ):  # fmt: skip
                bad.append(f"{name} seed {r['seed']}")
    return bad


def choice(runs: list[dict], grid: list[float], readable: bool) -> str:
    lr = runs[0]["lr"]
    edge = " **edge**" if len(grid) > 1 and lr in (min(grid), max(grid)) else ""
    if readable:
        return f"{lr:g}{edge} ({min(grid):g}-{max(grid):g})" if grid else f"{lr:g}"
    span = f"{min(grid):g}..{max(grid):g} ({len(grid)})" if grid else "-"
    return f"{lr:g}{edge} | {span}"


def row_order(groups: dict, readable: bool) -> list[str]:
    if readable:
        rank = {name: i for i, name in enumerate(READABLE)}
        return sorted(groups, key=lambda n: (rank.get(n, len(rank)), n))
    return sorted(groups, key=lambda n: (n != "muon", n != "torch-muon", n))


def muon_for(name: str, groups: dict, against: dict) -> list[dict]:
    """The Muon runs ``name`` is timed against: its job's rerun, else the first job's."""
    return groups[against[name]] if name in against else groups.get("muon", [])


def time_cell(runs: list[dict], metric: str, target: float) -> str:
    """Seconds to the target over the seeds that reached it, and how many did (k/n)."""
    times = [t for t in (time_to(r, metric, target) for r in runs) if t is not None]
    return f"{mean_interval(times)} ({len(times)}/{len(runs)})"


def headline(setting: str, groups, grids, against, meta, readable: bool = False) -> list[str]:
    metric = metric_of(meta)
    steps = records(next(iter(groups.values()))[0])[-1]["step"]
    targets = val_targets(meta)
    hardest, middle = targets[-1], targets[len(targets) // 2]
    test = metric.replace("val_", "test_")
    sign = "≤" if metric.endswith("_loss") else "≥"
    lr_columns = "lr (grid)" if readable else "lr | grid (values)"
    title = f"#### {TITLES.get(setting, setting)}" if readable else (
        f"### {setting}: {meta['model']} on {meta['dataset']}, {steps} steps"
    )  # fmt: skip
    lines = [
        title,
        "",
        f"| optimizer | {lr_columns} | {metric} {sign} {hardest}: s (k/n) | speedup over "
        f"Muon | {metric} {sign} {middle}: s (k/n) | speedup over Muon | final {metric} | "
        f"final {test} | s per step |",
        "|---|---|---|---|---|---|---|---|---|" + ("" if readable else "---|"),
    ]
    for name in row_order(groups, readable):
        runs = groups[name]
        label = READABLE.get(name, name) if readable else name
        cells = [label, choice(runs, grids.get(name, []), readable)]
        for target in (hardest, middle):
            cells.append(time_cell(runs, metric, target))
            reference = muon_for(name, groups, against)
            cells.append("—" if name == "muon" else speedup(runs, reference, metric, target))
        per_step = statistics.mean(
            records(r)[-1]["train_time"] / records(r)[-1]["step"] for r in runs
        )
        cells += [final(runs, metric), final(runs, test), f"{per_step:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for name, partner in PAIRS.items():
        if name in groups and partner in groups and not readable:
            cells = [
                f"{speedup(groups[name], groups[partner], metric, t)} to {t}"
                for t in reversed(targets)
            ]
            lines.append(f"\n{name} over {partner} (paired): {'; '.join(cells)}.")
    for rerun in sorted(set(against.values())):
        timed = ", ".join(
            READABLE.get(n, n) if readable else n for n in against if against[n] == rerun
        )
        lines.append(
            f"\nSpeedups of {timed}: over {READABLE.get(rerun, rerun) if readable else rerun} "
            "(Muon at its choice, rerun in their session); that row's: over Muon."
        )
    bad = unpaired(groups)
    if "muon" not in groups:
        lines.append("\nPairing with Muon: no Muon runs in this setting yet.")
    elif bad:
        lines.append(f"\n**Not paired with Muon** (fingerprints differ): {', '.join(bad)}.")
    elif not readable:
        lines.append("\nPairing: every run started from Muon's weights and batches of its seed.")
    return lines + [""]


def sweep_table(setting: str, sweeps, groups, meta) -> list[str]:
    metric = metric_of(meta)
    target = meta["select_target"]
    lines = [
        f"#### {setting}: sweep (2 seeds per value; mean final {metric}, median s to "
        f"{target}; chosen value in bold)",
        "",
    ]
    for name, runs in sorted(sweeps.items()):
        by_lr = runs_by_lr(runs)
        chosen = groups[name][0]["lr"] if name in groups else None
        cells = []
        for lr in sorted(by_lr):
            finals = statistics.mean(records(r)[-1][metric] for r in by_lr[lr])
            times = [time_to(r, metric, target) for r in by_lr[lr]]
            reached = [t for t in times if t is not None]
            median = f"{statistics.median(reached):.0f} s" if len(reached) == len(times) else "-"
            cell = f"{lr:g}: {finals:.3f}, {median}"
            cells.append(f"**{cell}**" if lr == chosen else cell)
        lines.append(f"- {name}: " + "; ".join(cells))
    return lines + [""]


def update_shares(setting: str, groups) -> list[str]:
    lines = [f"#### {setting}: share of steps that updated each layer (final runs, mean)", ""]
    for name, runs in sorted(groups.items()):
        counts = [r.get("update_counts") for r in runs]
        if not counts or counts[0] is None or not name.startswith(("dropmuon", "dropadamw")):
            continue
        steps = statistics.mean(records(r)[-1]["step"] for r in runs)
        shares = [statistics.mean(c[i] for c in counts) / steps for i in range(len(counts[0]))]
        names = runs[0].get("layer_names") or [str(i) for i in range(len(shares))]
        lines.append(f"- {name}: " + ", ".join(f"{n} {s:.2f}" for n, s in zip(names, shares)))
    return lines + [""]


def runs_by_lr(runs: list[dict]) -> dict[float, list[dict]]:
    by_lr: dict[float, list[dict]] = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r)
    return by_lr


def best_sweep_time(runs: list[dict], metric: str, target: float) -> str:
    """The sweep's median time to ``target`` at the lr the harness's own rule (``select_lr``)
    would choose for it: the optimizer at its best lr for this target."""
    by_lr = runs_by_lr(runs)
    if not by_lr:
        return "- (no sweep)"
    choice = select_lr(by_lr, metric, target)
    times = [time_to(r, metric, target) for r in by_lr[choice.lr]]
    if None in times:  # select_lr fell back to the final metric: no lr got there in its seeds
        return "- (no lr reached it in its sweep seeds)"
    return f"{statistics.median(times):.1f} s (lr {choice.lr:g})"


def check_target(root: Path, setting: str, target: float) -> list[str]:
    """One setting's final runs and sweep timed to a validation target chosen after the runs."""
    groups, _, sweeps, against, meta = gather(root, setting)
    if meta is None:
        raise SystemExit(f"no finished runs of {setting} under {root}")
    metric = metric_of(meta)
    sign = "≤" if metric.endswith("_loss") else "≥"
    lines = [
        f"#### {setting}: {metric} {sign} {target:g}, a target chosen after the runs (the lrs "
        "were chosen for the setting's own targets)",
        "",
        "| optimizer | steps to it per final seed | s (k/n) | speedup over Muon | sweep: best "
        "median s (at lr) |",
        "|---|---|---|---|---|",
    ]
    for name in row_order(groups, readable=False):
        runs = groups[name]
        steps = ", ".join(str(s) if s else "-" for s in (steps_to(r, metric, target) for r in runs))
        reference = muon_for(name, groups, against)
        cells = [
            name,
            steps,
            time_cell(runs, metric, target),
            "—" if name == "muon" else speedup(runs, reference, metric, target),
            best_sweep_time(sweeps.get(name, []), metric, target),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def main(root: Path, results: bool) -> None:
    lines = [] if results else [f"# Study, third edition: tables (from {root})", ""]
    for setting in SETTINGS:
        groups, grids, sweeps, against, meta = gather(root, setting)
        if meta is None:
            continue
        lines += headline(setting, groups, grids, against, meta, readable=results)
        if results:
            continue
        lines += sweep_table(setting, sweeps, groups, meta)
        lines += update_shares(setting, groups)
    times = root / "times.txt"
    if times.is_file() and not results:
        lines += ["## Wall time per job", "", *times.read_text().splitlines(), ""]
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "root", nargs="?", type=Path, default=Path(__file__).parent / "results" / "study3"
    )
    parser.add_argument("--results", action="store_true", help="only RESULTS.md's headline tables")
    parser.add_argument(
        "--check-target",
        nargs=2,
        metavar=("SETTING", "VALUE"),
        help="one setting's times to a validation target chosen after the runs",
    )
    arguments = parser.parse_args()
    if arguments.check_target:
        setting, value = arguments.check_target
        if setting not in SETTINGS:
            parser.error(f"--check-target: unknown setting {setting!r}; one of {SETTINGS}")
        try:
            target = float(value)
        except ValueError:
            parser.error(f"--check-target: the target must be a number, not {value!r}")
        print("\n".join(check_target(arguments.root, setting, target)))
    else:
        main(arguments.root, arguments.results)
