"""The third edition's scripts: benchmarks/run_study3.py's grid rule (a choice at either end of
its grid widens the grid by the next ladder value on that side; an interior choice, or the
ladder's end, stops), benchmarks/layer_skip.py's batches (the harness's, epoch after epoch) and
benchmarks/study3_tables.py's check against a target chosen after the runs."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from dropmuon.compare.data import batches

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study3 = load_script("run_study3")
layer_skip = load_script("layer_skip")


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


def test_layer_skip_trains_on_a_new_order_every_epoch_as_the_harness_does():
    task = SimpleNamespace(num_train=12)
    drawn = layer_skip.harness_batches(task, batch_size=4, seed=3)
    seen = [next(drawn) for _ in range(7)]  # two epochs of 3 batches, and one more
    shuffle = torch.Generator().manual_seed(3)  # dropmuon-compare's, for seed 3
    harness = [b for _ in range(3) for b in batches(12, 4, shuffle)][:7]
    assert all(torch.equal(a, b) for a, b in zip(seen, harness))
    first, second = torch.cat(seen[:3]), torch.cat(seen[3:6])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(12))
    assert not torch.equal(first, second)  # not the first epoch's order again


def test_every_job_but_the_first_of_its_setting_reruns_muon_in_its_final_call(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(study3, "OUT", tmp_path)
    calls = []
    monkeypatch.setattr(
        study3, "compare", lambda folder, s, optimizers, e, grids, sweep_only: calls.append(
            (folder.name, list(optimizers), dict(grids), sweep_only)
        )
    )  # fmt: skip
    monkeypatch.setattr(study3, "widened", lambda *a: False)
    assert study3.base_job("paper-cnn") == "paper-cnn"
    try:
        study3.run_job("paper-cnn-baselines")
    except SystemExit as stop:  # the base job has not chosen Muon's lr yet
        assert "job paper-cnn first" in str(stop)
    else:
        raise AssertionError("ran without the base job's choice")

    (tmp_path / "paper-cnn" / "runs").mkdir(parents=True)
    run = dict(optimizer="muon", lr=0.04, seed=0)
    (tmp_path / "paper-cnn" / "runs" / "muon_seed0.json").write_text(json.dumps(run))
    calls.clear()
    study3.run_job("paper-cnn-baselines")
    (sweep, *_), final = calls[:-1], calls[-1]
    assert sweep[3] and "muon" not in sweep[1] and "muon" not in sweep[2]  # not tuned again
    assert not final[3] and final[1][-1] == "muon" and final[2]["muon"] == [0.04]
    grids = json.loads((tmp_path / "paper-cnn-baselines" / "grids.json").read_text())
    assert "muon" not in grids

    calls.clear()
    study3.run_job("paper-cnn")  # the base job tunes Muon itself: no rerun added
    assert calls[-1][1].count("muon") == 1 and calls[-1][2]["muon"] == [0.01, 0.02, 0.04, 0.08]


def write_run(folder, optimizer, seed, lr, reached):
    """A run whose validation accuracy is 0.5 at step 20 and 0.9 from ``reached`` = (step,
    seconds) on (never, for None)."""
    evals = [dict(step=20, train_time=5.0, val_acc=0.5)]
    if reached:
        evals.append(dict(step=reached[0], train_time=reached[1], val_acc=0.9))
    meta = dict(task="classification", targets=[["val_acc", 0.75]], select_target=0.75)
    run = dict(optimizer=optimizer, seed=seed, lr=lr, evals=evals, meta=meta,
               init_fingerprint="w", order_fingerprint="b")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    name = optimizer.replace(":", "-")
    (folder / f"{name}_lr{lr:g}_seed{seed}.json").write_text(json.dumps(run))


def test_check_target_times_each_optimizer_against_the_muon_it_ran_beside(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # study3_tables imports study_tables beside it
    tables = load_script("study3_tables")
    first, blocks = tmp_path / "resnet18", tmp_path / "resnet18-blocks"
    for job in (first, blocks):
        job.mkdir()
        (job / "grids.json").write_text(json.dumps({"muon": [0.01], "dropmuon:uniform": [0.01]}))
    for seed, muon, uniform in ((0, (100, 50.0), (80, 25.0)), (1, (120, 60.0), (100, 30.0))):
        write_run(first / "runs", "muon", seed, 0.01, muon)
        write_run(first / "runs", "dropmuon:uniform", seed, 0.01, uniform)
        write_run(blocks / "runs", "muon", seed, 0.01, (100, 40.0))  # the rerun: a faster machine
        write_run(blocks / "runs", "dropmuon:uniform", seed, 0.01, (60, 20.0))
    for seed, lr, reached in ((1000, 0.01, (100, 50.0)), (1001, 0.01, (120, 70.0)),
                              (1000, 0.02, (80, 40.0)), (1001, 0.02, (80, 44.0))):  # fmt: skip
        write_run(first / "sweep", "muon", seed, lr, reached)
    for seed, lr, reached in ((1000, 0.01, (80, 30.0)), (1001, 0.01, (80, 40.0)),
                              (1000, 0.02, (60, 10.0)), (1001, 0.02, None)):  # fmt: skip
        write_run(first / "sweep", "dropmuon:uniform", seed, lr, reached)

    lines = tables.check_target(tmp_path, "resnet18", 0.85)
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")
    )}  # fmt: skip
    assert rows["muon"][:3] == ["100, 120", "54.8 [50.0, 60.0] (2/2)", "—"]
    assert rows["muon"][3] == "42.0 s (lr 0.02)"  # the best median over lrs every seed reached
    assert rows["dropmuon:uniform"][0] == "80, 100"
    assert rows["dropmuon:uniform"][2] == "2.00x [2.00, 2.00]"  # 50/25 and 60/30
    assert rows["dropmuon:uniform"][3] == "35.0 s (lr 0.01)"  # lr 0.02: one seed never got there
    assert rows["dropmuon:uniform [blocks]"][2] == "2.00x [2.00, 2.00]"  # over its rerun, 40/20
    assert rows["muon [rerun with blocks]"][0] == "100, 100"
    assert rows["dropmuon:uniform [blocks]"][3].startswith("-")  # no sweep of its own here
