"""benchmarks/run_study3.py's grid rule: a choice at either end of its grid widens the grid by
the next ladder value on that side; an interior choice, or the ladder's end, stops."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "run_study3.py"
spec = importlib.util.spec_from_file_location("run_study3", SCRIPT)
study3 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study3)


def write_sweep(folder, optimizer, times):
    """Sweep runs of ``optimizer``: at each lr, two seeds reaching 0.8 after ``times[lr]`` s."""
    (folder / "sweep").mkdir(parents=True, exist_ok=True)
    for lr, seconds in times.items():
        for seed in (1000, 1001):
            evals = [dict(train_time=seconds, val_acc=0.85 if seconds else 0.5)]
            run = dict(optimizer=optimizer, lr=lr, seed=seed, evals=evals)
            (folder / "sweep" / f"{optimizer}_lr{lr:g}_seed{seed}.json").write_text(json.dumps(run))


def test_a_choice_at_an_edge_widens_the_grid_on_that_side(tmp_path):
    grids = {"muon": [0.01, 0.02, 0.04, 0.08], "adamw": [5e-4, 1e-3, 2e-3, 5e-3]}
    write_sweep(tmp_path, "muon", {0.01: 9.0, 0.02: 8.0, 0.04: 7.0, 0.08: 5.0})  # top: fastest
    write_sweep(tmp_path, "adamw", {5e-4: 9.0, 1e-3: 4.0, 2e-3: 6.0, 5e-3: 8.0})  # interior
    assert study3.widened(grids, tmp_path, "val_acc", 0.8)
    assert grids == {"muon": [0.01, 0.02, 0.04, 0.08, 0.16], "adamw": [5e-4, 1e-3, 2e-3, 5e-3]}

    write_sweep(tmp_path, "muon", {0.16: 6.0})  # 0.08 now interior
    assert not study3.widened(grids, tmp_path, "val_acc", 0.8)


def test_the_bottom_edge_widens_downwards_until_the_ladder_ends(tmp_path):
    assert study3.start_grid("dropmuon:cost_optimal") == [0.01, 0.02, 0.04, 0.08]
    assert study3.start_grid("dropadamw:uniform") == [5e-4, 1e-3, 2e-3, 5e-3]
    grids = {"muon": [0.0025, 0.005]}  # the ladder's lowest value chosen: nothing below it
    write_sweep(tmp_path, "muon", {0.0025: 3.0, 0.005: 6.0})
    assert not study3.widened(grids, tmp_path, "val_acc", 0.8)
    grids = {"muon": [0.01, 0.02]}
    write_sweep(tmp_path, "muon", {0.01: 3.0, 0.02: 6.0})
    assert study3.widened(grids, tmp_path, "val_acc", 0.8)
    assert grids == {"muon": [0.005, 0.01, 0.02]}
