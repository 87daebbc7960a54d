"""The smoothness tables of RESULTS.md section 3 (issue 26): per-layer estimates and the
cost-optimal distribution they induce, before the one-scale fix (the second edition's runs,
benchmarks/results/study/smoothness/) and after it (benchmarks/run_smoothness.sh), at the
first, middle and last evaluation; and the estimates refreshed every step against every 10th.

    python3 benchmarks/smoothness_tables.py > benchmarks/results/smoothness/tables.md
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import dropmuon

ROOT = Path(__file__).resolve().parent / "results"
BEFORE = ROOT / "study" / "smoothness"
AFTER = ROOT / "smoothness"
SETTINGS = (
    "fashion-mnist-paper-cnn", "mnist-paper-cnn", "fashion-mnist-resnet18", "fashion-mnist-vit",
    "fortunes-gpt",
)  # fmt: skip


def run_of(folder: Path) -> dict | None:
    paths = sorted((folder / "runs").glob("*.json"))
    return json.loads(paths[0].read_text()) if paths else None


def estimated(run: dict) -> list[dict]:
    """The evaluations where the estimates are ready (every layer with matrices has one)."""
    ready = []
    for e in run["evals"]:
        values = e.get("smoothness")
        if values and any(v is not None for v in values):
            ready.append(e)
    return ready


def vector_only(run: dict) -> list[bool]:
    """The layers that never got an estimate in ``run`` (after the fix: the layers of vectors)."""
    last = estimated(run)[-1]["smoothness"]
    return [v is None for v in last]


def distribution(values: list[float | None]) -> list[float]:
    """cost_optimal's P(cutoff) from these estimates (None: a layer of vectors, taken as 0)."""
    clean = [0.0 if v is None else v for v in values]
    return [float(x) for x in dropmuon.sampler_distribution(len(clean), "cost_optimal",
                                                            smoothness=clean)]  # fmt: skip


def summary(p: list[float], names: list[str], vectors: list[bool]) -> str:
    q = [sum(p[: i + 1]) for i in range(len(p))]
    on_vectors = sum(pi for pi, v in zip(p, vectors) if v)
    top = max(range(len(p)), key=lambda i: p[i])
    return (
        f"P(full) {p[0]:.2f}; mass on layers of vectors {on_vectors:.2f}; most likely cutoff "
        f"{names[top]} ({p[top]:.2f}); mean fraction of layers updated {sum(q) / len(q):.2f}"
    )


def fmt(values) -> str:
    return "[" + ", ".join("-" if v is None else f"{v:.3g}" for v in values) + "]"


def section(setting: str) -> list[str]:
    before, after = run_of(BEFORE / setting), run_of(AFTER / "modules" / setting)
    if before is None or after is None:
        return []
    names = after["layer_names"]
    if before["layer_names"] != names:
        raise SystemExit(f"{setting}: the before and after runs have different layers")
    vectors = vector_only(after)
    lines = [f"### {setting} ({len(names)} layers, {sum(vectors)} of vectors only)", ""]
    lines += ["| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, run in (("before", before), ("after", after)):
        evals = estimated(run)
        picks = {"first": evals[0], "middle": evals[len(evals) // 2], "last": evals[-1]}
        for when, e in picks.items():
            lines.append(f"| {label} L, {when} (step {e['step']}) | "
                         + " | ".join(fmt([v])[1:-1] for v in e["smoothness"]) + " |")  # fmt: skip
            p = distribution(e["smoothness"])
            lines.append(
                f"| {label} P(cutoff), {when} | " + " | ".join(f"{x:.2f}" for x in p) + " |"
            )
    lines.append("")
    for label, run in (("before", before), ("after", after)):
        evals = estimated(run)
        picks = {"first": evals[0], "middle": evals[len(evals) // 2], "last": evals[-1]}
        for when, e in picks.items():
            p = distribution(e["smoothness"])
            lines.append(f"- {label}, {when} evaluation: {summary(p, names, vectors)}")
    return lines + [""]


def total_variation(p: list[float], q: list[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def sparse_section() -> list[str]:
    lines = [
        "## Refreshing every step vs every 10th step (`--smoothness-every 10`)",
        "",
        "The same training (Muon's updates do not depend on the estimates); at each evaluation "
        "where both have estimates: the median over layers of |log(L_every10 / L_every1)| and "
        "the total variation distance between the induced distributions; for scale, how far the "
        "every-step distribution itself moves between consecutive evaluations (median TV).",
        "",
        "| setting | evaluations | median abs log ratio (first, last) | TV distance (first, last) "
        "| every step: TV between evaluations |",
        "|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        every1 = run_of(AFTER / "modules" / setting)
        every10 = run_of(AFTER / "every10" / setting)
        if every1 is None or every10 is None:
            continue
        pairs = []
        for a, b in zip(every1["evals"], every10["evals"]):
            la, lb = a.get("smoothness") or [], b.get("smoothness") or []
            both = [(x, y) for x, y in zip(la, lb) if x is not None and y is not None]
            ready_b = all((x is None) == (y is None) for x, y in zip(la, lb))
            if both and ready_b:
                ratios = sorted(abs(math.log(y / x)) for x, y in both)
                tv = total_variation(distribution(la), distribution(lb))
                pairs.append((ratios[len(ratios) // 2], tv))
        ready = [distribution(e["smoothness"]) for e in estimated(every1)]
        drift = sorted(total_variation(a, b) for a, b in zip(ready, ready[1:]))
        if pairs:
            lines.append(
                f"| {setting} | {len(pairs)} | {pairs[0][0]:.2f}, {pairs[-1][0]:.2f} | "
                f"{pairs[0][1]:.2f}, {pairs[-1][1]:.2f} | "
                f"{drift[len(drift) // 2] if drift else math.nan:.2f} |"
            )
    return lines + [""]


def blocks_section() -> list[str]:
    lines = ["## Depth units (`--layers blocks`), last evaluation", ""]
    for setting in SETTINGS:
        run = run_of(AFTER / "blocks" / setting)
        if run is None:
            continue
        names = run["layer_names"]
        values = estimated(run)[-1]["smoothness"]
        p = distribution(values)
        lines.append(f"- **{setting}** ({len(names)} units): L = {fmt(values)}; P(cutoff) = "
                     f"[{', '.join(f'{x:.2f}' for x in p)}]; units {', '.join(names)}")  # fmt: skip
    return lines + [""]


def main() -> None:
    lines = [
        "# Smoothness estimates before and after the one-scale fix (issue 26)",
        "",
        "Muon (every layer active every step), one seed, lr 0.05; `before`: the second "
        "edition's estimator (each parameter in its update's geometry, AdamW parameters in "
        "Frobenius; benchmarks/results/study/smoothness/); `after`: each matrix in the RMS->RMS "
        "operator norm, vectors riding along (benchmarks/run_smoothness.sh). `-`: no estimate "
        "(a layer of vectors only, taken as 0 by cost_optimal).",
        "",
    ]
    for setting in SETTINGS:
        lines += section(setting)
    lines += sparse_section()
    lines += blocks_section()
    sys.stdout.write("\n".join(lines))


if __name__ == "__main__":
    main()
