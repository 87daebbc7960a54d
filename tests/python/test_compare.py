"""The main job end to end on the synthetic sets (images and text), its errors, interrupted
and resumed runs, the validation split, the sweep's selection, the paired seeds, the bootstrap
intervals and the evaluation schedule; the harness's separation from the library."""

import itertools
import json
import math
import subprocess
import sys

import pytest
import torch

from dropmuon.compare import cli, data, experiment, stats, train
from dropmuon.compare.tasks import ImageTask


def run_compare(tmp_path, *extra):
    argv = [
        "--dataset",
        "synthetic",
        "--epochs",
        "2",
        "--batch-size",
        "128",
        "--seeds",
        "0",
        "1",
        "--no-progress",
        "--output",
        str(tmp_path),
        "--lr",
        "0.05",
        *extra,
    ]
    return cli.main(argv)


def test_end_to_end_writes_every_output(tmp_path, capsys):
    optimizers = ["dropmuon", "dropmuon:epoch_shift", "muon", "torch-muon", "adamw"]
    assert run_compare(tmp_path, "--optimizers", *optimizers) == 0
    for name in (
        "summary.md",
        "runs.csv",
        "accuracy_vs_time.png",
        "accuracy_vs_epoch.png",
        "time_breakdown.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    runs = sorted((tmp_path / "runs").glob("*.json"))
    assert len(runs) == 10
    run = json.loads(runs[0].read_text())
    assert len(run["evals"]) == 2 and run["evals"][-1]["step"] == 16
    assert {"train_acc", "test_acc", "train_time", "forward_time"} <= set(run["evals"][0])
    summary = (tmp_path / "summary.md").read_text()
    assert "## Time to target" in summary and "## Where Drop-Muon loses" in summary
    assert "## Speedup over muon" in summary and "bootstrap interval" in summary
    assert "dropmuon:epoch_shift" in summary and "torch-muon" in summary
    assert "# synthetic, paper-cnn" in capsys.readouterr().out
    csv_rows = (tmp_path / "runs.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 10 * 2


def test_dropmuon_runs_record_their_cutoffs(tmp_path):
    assert run_compare(tmp_path, "--optimizers", "dropmuon", "--seeds", "3") == 0
    run = json.loads((tmp_path / "runs" / "dropmuon-uniform_seed3.json").read_text())
    assert len(run["cutoffs"]) == 16 and len(set(run["cutoffs"])) > 1
    assert sum(run["update_counts"]) > 16


def test_max_steps_beyond_the_epochs_is_an_error(tmp_path, capsys):
    # 384 images at batch 128: 3 steps an epoch, 6 in --epochs 2; 7 would be cut short silently.
    argv = ["--optimizers", "muon", "--train-size", "384", "--max-steps", "7"]
    assert run_compare(tmp_path, *argv) == 2
    err = capsys.readouterr().err
    assert "--max-steps 7 is more than --epochs 2 holds (3 steps an epoch)" in err
    assert "give --epochs 3 or more" in err and not (tmp_path / "runs").exists()
    argv[-1] = "6"  # exactly two epochs
    assert run_compare(tmp_path, *argv) == 0


def test_train_and_test_subsets_are_fixed_and_recorded(tmp_path):
    assert (
        run_compare(tmp_path, "--optimizers", "muon", "--train-size", "384", "--test-size", "100")
        == 0
    )
    first = json.loads((tmp_path / "runs" / "muon_seed0.json").read_text())
    assert first["meta"]["train_size"] == 384 and first["meta"]["test_size"] == 100
    assert first["steps_per_epoch"] == 3  # 384 images at batch 128
    # Test accuracy is counted over those 100 images: a multiple of 1/100.
    for record in first["evals"]:
        assert abs(record["test_acc"] * 100 - round(record["test_acc"] * 100)) < 1e-9
    synthetic = data.load_dataset("synthetic")
    one = ImageTask.from_dataset(synthetic, 100, 200, 50)
    again = ImageTask.from_dataset(synthetic, 100, 200, 50)
    assert torch.equal(one.train_x, again.train_x) and torch.equal(one.test_y, again.test_y)


def indexed_dataset(n_train=300, n_test=80):
    """Images whose every pixel holds their own index (train: 0.., test: 10000..)."""
    train_x = torch.arange(n_train, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    test_x = 10000 + torch.arange(n_test, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(
        -1, 1, 4, 4
    )
    labels = lambda n: torch.arange(n) % 10  # noqa: E731
    return data.Dataset(
        "indexed", train_x.clone(), labels(n_train), test_x.clone(), labels(n_test), 10
    )


def test_validation_split_is_disjoint_from_train_and_test():
    task = ImageTask.from_dataset(indexed_dataset(), val_size=64, train_size=128, test_size=40)
    ids = lambda x: set(x[:, 0, 0, 0].long().tolist())  # noqa: E731
    train, val, test = ids(task.train_x), ids(task.val_x), ids(task.test_x)
    assert (len(train), len(val), len(test)) == (128, 64, 40)
    assert not train & val and not train & test and not val & test
    assert all(i < 10000 for i in train | val) and all(i >= 10000 for i in test)
    assert ids(task.train_x[task.eval_train]) <= train  # train metrics: on training images
    with pytest.raises(ValueError, match="leaves no training images"):
        ImageTask.from_dataset(indexed_dataset(), val_size=300)


def test_layers_and_smoothness_every_reach_dropmuon():
    from dropmuon.compare.models import build_language_model

    model = build_language_model("gpt", 20, 8)
    args = cli.build_parser().parse_args(["--layers", "blocks", "--smoothness-every", "3"])
    spec = train.OptimizerSpec.parse("dropmuon:cost_optimal")
    opt = train.build_optimizer(spec, model, args, 0, 10, 0.05)
    assert opt.layer_names() == ["token+position", "blocks.0", "blocks.1", "norm+head"]
    tokens = torch.randint(0, 20, (4, 9))
    for s in range(4):  # estimates armed at the 3rd active step, taken at the 4th
        opt.zero_grad()
        logits = model(tokens[:, :-1]).flatten(0, 1)
        torch.nn.functional.cross_entropy(logits, tokens[:, 1:].flatten()).backward()
        opt.step()
        assert all(v is None for v in opt.smoothness) == (s < 3), s
    default = train.build_optimizer(spec, model, cli.build_parser().parse_args([]), 0, 10, 0.05)
    assert default.num_layers == 16  # per-module layers by default


def test_smoothness_every_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_compare(tmp_path, "--smoothness-every", "0")
    assert "--smoothness-every must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--train-size", "--test-size", "--eval-train-size"])
def test_subset_sizes_must_be_positive(tmp_path, option, capsys):
    with pytest.raises(SystemExit):
        run_compare(tmp_path, option, "0")
    assert f"{option} must be positive, got 0" in capsys.readouterr().err


def test_wrong_dataset_name_and_path(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--dataset", "imagenet", "--output", str(tmp_path)])
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err
    code = cli.main(
        [
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(tmp_path / "nowhere"),
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "no folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetError, match="has no train-images-idx3-ubyte"):
        data.load_dataset("mnist", str(tmp_path / "empty"))
    with pytest.raises(data.DatasetError, match="cifar10 needs --data-dir"):
        data.load_dataset("cifar10")
    with pytest.raises(SystemExit):
        cli.main(["--optimizers", "sgd"])
    assert "unknown optimizer 'sgd'" in capsys.readouterr().err


def test_interrupted_comparison_keeps_finished_runs(tmp_path, monkeypatch):
    real = experiment.train_run
    calls = []

    def interrupt_third(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 3:  # two finished runs, then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "train_run", interrupt_third)
    assert run_compare(tmp_path, "--optimizers", "dropmuon", "muon") == 130
    runs = sorted(p.name for p in (tmp_path / "runs").glob("*"))
    assert runs == ["dropmuon-uniform_seed0.json", "muon_seed0.json"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| muon |" in summary and "| dropmuon:uniform |" in summary
    for path in (tmp_path / "runs").glob("*.json"):
        json.loads(path.read_text())  # complete files


def test_resume_reruns_only_what_is_missing(tmp_path, monkeypatch):
    assert run_compare(tmp_path, "--optimizers", "muon", "--seeds", "0") == 0
    before = (tmp_path / "runs" / "muon_seed0.json").read_text()
    real, trained = experiment.train_run, []

    def counting(spec, seed, *args, **kwargs):
        trained.append((spec.name, seed))
        return real(spec, seed, *args, **kwargs)

    monkeypatch.setattr(experiment, "train_run", counting)
    assert run_compare(tmp_path, "--optimizers", "muon", "--seeds", "0", "1", "--resume") == 0
    assert trained == [("muon", 1)]  # seed 0 was loaded, not rerun
    assert (tmp_path / "runs" / "muon_seed0.json").read_text() == before
    # A different lr is not the same run: rerun.
    assert (
        run_compare(tmp_path, "--optimizers", "muon", "--seeds", "0", "--resume", "--lr", "0.02")
        == 0
    )
    assert trained[-1] == ("muon", 0)


def test_idx_reader_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x02" + b"\x00\x00")
    with pytest.raises(data.DatasetError, match="not an unsigned-byte IDX file"):
        data.read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(b"\x00\x00\x08\x01" + b"\x00\x00\x00\x05" + b"\x01\x02")
    with pytest.raises(data.DatasetError, match="header says 5"):
        data.read_idx(short)


def test_shipped_mnist_loads():
    mnist = data.load_dataset("mnist")
    assert mnist.train_x.shape == (8000, 1, 28, 28) and mnist.test_x.shape == (2000, 1, 28, 28)
    assert torch.bincount(mnist.train_y).tolist()[:3] == [804, 893, 792]
    assert abs(mnist.train_x.mean().item()) < 1e-4


def test_torch_muon_holds_conv_kernels_as_matrices():
    from dropmuon.compare.models import PaperCNN

    model = PaperCNN(1, 10, 12, channels=(4, 8, 8))
    args = cli.build_parser().parse_args([])
    opt = train.build_optimizer(train.OptimizerSpec.parse("torch-muon"), model, args, 0, 10, 0.1)
    muon, adamw = opt.optimizers
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    assert len(muon.param_groups[0]["params"]) == 4  # 3 conv kernels + head
    assert all(p.dim() == 1 for g in adamw.param_groups for p in g["params"])
    assert model(torch.randn(2, 1, 12, 12)).shape == (2, 10)


def test_cifar10_pickle_layout(tmp_path):
    import pickle

    g = torch.Generator().manual_seed(0)
    for name, n in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 3)]:
        batch = {
            b"data": torch.randint(
                0, 256, (n, 3 * 32 * 32), generator=g, dtype=torch.uint8
            ).numpy(),
            b"labels": torch.randint(0, 10, (n,), generator=g).tolist(),
        }
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    cifar = data.load_dataset("cifar10", str(tmp_path))
    assert cifar.train_x.shape == (20, 3, 32, 32) and cifar.test_x.shape == (3, 3, 32, 32)
    assert cifar.train_y.dtype == torch.int64 and cifar.in_channels == 3
    assert torch.allclose(cifar.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(data.DatasetError, match="has no test_batch"):
        data.load_dataset("cifar10", str(tmp_path))


def test_library_imports_no_harness_and_harness_data_needs_no_plots():
    # Against what torch itself loads (torch.hub imports tqdm when it is installed).
    code = (
        "import sys, torch\n"
        "loaded = set(sys.modules)\n"
        "import dropmuon\n"
        "print(sorted(m for m in set(sys.modules) - loaded if 'compare' in m))\n"
        "import dropmuon.compare.models, dropmuon.compare.data\n"
        "new = set(sys.modules) - loaded\n"
        "print(sorted(m for m in new if m.split('.')[0] in ('matplotlib', 'tqdm')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "[]"]


def test_module_entry_point_is_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "dropmuon.compare", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("usage: dropmuon-compare") and "--dataset" in out.stdout


# --------------------------------------------------------------------------------------------
# The sweep, the statistics, the evaluation schedule
# --------------------------------------------------------------------------------------------


def fake_run(lr, seed, val, test, times=(1.0, 2.0)):
    """A run with two evaluations; val/test accuracy reached at the second."""
    return dict(
        optimizer="x",
        seed=seed,
        lr=lr,
        evals=[
            dict(step=2, epoch=0.5, train_time=times[0], val_acc=0.1, test_acc=0.1),
            dict(step=4, epoch=1.0, train_time=times[1], val_acc=val, test_acc=test),
        ],
    )


def test_the_sweep_selects_on_validation_never_on_test():
    # lr 0.1: better on test, worse on validation; lr 0.01 the reverse.
    by_lr = {
        0.01: [fake_run(0.01, s, val=0.9, test=0.5) for s in (0, 1)],
        0.1: [fake_run(0.1, s, val=0.6, test=0.95) for s in (0, 1)],
        0.05: [fake_run(0.05, s, val=0.7, test=0.7) for s in (0, 1)],
    }
    by_final = stats.select_lr(by_lr, "val_acc", None)
    assert by_final.lr == 0.01 and by_final.at_edge and "final val_acc" in by_final.criterion
    by_time = stats.select_lr(by_lr, "val_acc", 0.8)
    assert by_time.lr == 0.01 and "median time" in by_time.criterion
    # Nobody reaches the target: the fallback decides.
    assert stats.select_lr(by_lr, "val_acc", 0.99).lr == 0.01
    # Faster to the target wins over a better final value.
    by_lr[0.05] = [fake_run(0.05, s, val=0.85, test=0.7, times=(0.5, 1.5)) for s in (0, 1)]
    chosen = stats.select_lr(by_lr, "val_acc", 0.8)
    assert chosen.lr == 0.05 and not chosen.at_edge


def test_the_sweep_end_to_end_chooses_by_its_validation_runs(tmp_path, monkeypatch):
    """The issue's tiny sweep, with the runs' validation metric steered per lr: the chosen lr
    is the one validation favours, and the report says which and whether it is at an edge."""
    real = experiment.train_run
    favoured = {"muon": 0.05, "dropmuon:uniform": 0.02}

    def steered(spec, seed, task, args, lr, progress=None):
        run = real(spec, seed, task, args, lr, progress)
        if seed >= experiment.SWEEP_SEED_BASE:  # sweep runs: validation favours one value
            for record in run["evals"]:
                record["val_acc"] = 0.9 if lr == favoured[spec.name] else 0.1
                record["test_acc"] = 0.1 if lr == favoured[spec.name] else 0.9
        return run

    monkeypatch.setattr(experiment, "train_run", steered)
    argv = ["--dataset", "synthetic", "--optimizers", "dropmuon", "muon", "--lr-grid", "0.02",
            "0.05", "--seeds", "0", "1", "--epochs", "1", "--eval-every-steps", "2",
            "--val-size", "128", "--no-progress", "--output", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    rows = (tmp_path / "sweep.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2  # header, 2 optimizers x 2 values x 2 sweep seeds
    for name, lr in favoured.items():
        final = json.loads((tmp_path / "runs" / f"{name.replace(':', '-')}_seed0.json").read_text())
        assert final["lr"] == lr
    summary = (tmp_path / "summary.md").read_text()
    assert "## Learning-rate sweep (on the validation split)" in summary
    assert "- muon: lr 0.05, by best mean final val_acc — **at the grid's edge**" in summary


def test_sweep_only_writes_the_choices_and_no_final_runs(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--optimizers", "dropadamw", "adamw", "--lr-grid",
            "adamw=1e-3,3e-3", "dropadamw:uniform=1e-3,3e-3", "0.01", "--sweep-seeds", "1",
            "--epochs", "1", "--val-size", "128", "--no-progress", "--sweep-only",
            "--output", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    rows = (tmp_path / "sweep.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 2  # header, 2 optimizers x 2 values x 1 sweep seed
    assert not (tmp_path / "runs").exists()
    out = capsys.readouterr().out
    assert "dropadamw:uniform: lr " in out and "adamw: lr " in out


def test_drop_adamw_updates_every_role_with_adamw_and_truncates():
    from dropmuon.compare.models import PaperCNN

    model = PaperCNN(1, 10, 12, channels=(4, 8, 8))
    args = cli.build_parser().parse_args([])
    spec = train.OptimizerSpec.parse("dropadamw")
    assert spec.name == "dropadamw:uniform"
    opt = train.build_optimizer(spec, model, args, 0, 10, 3e-3)
    assert {opt.norm_of(p) for p in model.parameters()} == {"adamw"}
    assert all(g["lr"] * g["adamw_lr_ratio"] == 3e-3 for g in opt.param_groups)  # AdamW's lr
    for _ in range(6):
        cutoff = opt.cutoff
        opt.zero_grad()
        model(torch.randn(4, 1, 12, 12)).square().mean().backward()
        for p in model.parameters():
            assert (p.grad is None) == (opt.layer_of(p) < cutoff)
        opt.step()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--optimizers", "adamw:uniform"])


def test_a_sweep_needs_a_validation_split(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--dataset", "synthetic", "--lr-grid", "0.01", "0.02", "--output", str(tmp_path)])
    assert "--lr-grid chooses on the validation split: give --val-size" in capsys.readouterr().err


def test_lr_tables():
    assert cli.parse_lr(["0.05", "adamw=0.003", "dropmuon:epoch_shift=0.2"]) == {
        "default": 0.05,
        "adamw": 0.003,
        "dropmuon:epoch_shift": 0.2,
    }
    grid = cli.parse_lr_grid(["0.05", "0.02", "adamw=1e-3,3e-4"])
    assert grid == {"default": [0.02, 0.05], "adamw": [3e-4, 1e-3]}
    spec = train.OptimizerSpec.parse("dropmuon:epoch_shift")
    assert train.learning_rate(spec, cli.parse_lr(["0.05", "dropmuon:epoch_shift=0.2"])) == 0.2
    assert train.learning_rate(train.OptimizerSpec.parse("muon"), {"default": 0.1}) == 0.1
    with pytest.raises(Exception, match="unknown optimizer 'sgd'"):
        cli.parse_lr_grid(["0.1", "sgd=0.1"])


def test_tau_nice_is_spelled_with_its_tau():
    spec = train.OptimizerSpec.parse("dropmuon:tau_nice:tau=2")
    assert (spec.sampling, spec.tau, spec.name) == ("tau_nice", 2, "dropmuon:tau_nice:tau=2")
    for bad in ("dropmuon:tau_nice", "dropmuon:tau_nice:tau=0", "dropmuon:uniform:tau=2"):
        with pytest.raises(Exception, match="tau"):
            train.OptimizerSpec.parse(bad)


def test_paired_seeds_share_initial_weights_and_batches(tmp_path):
    task = ImageTask.from_dataset(data.load_dataset("synthetic"), 64)
    args = cli.build_parser().parse_args(
        ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "128"]
    )
    runs = {
        (name, seed): train.train_run(train.OptimizerSpec.parse(name), seed, task, args, 0.05)
        for name in ("dropmuon", "torch-muon", "adamw")
        for seed in (0, 1)
    }
    for seed in (0, 1):
        prints = {
            (r["init_fingerprint"], r["order_fingerprint"])
            for (n, s), r in runs.items()
            if s == seed
        }
        assert len(prints) == 1, prints
    assert runs[("dropmuon", 0)]["init_fingerprint"] != runs[("dropmuon", 1)]["init_fingerprint"]
    assert runs[("dropmuon", 0)]["order_fingerprint"] != runs[("dropmuon", 1)]["order_fingerprint"]
    # The fingerprint tells different weights apart, not just different seeds.
    a, b = torch.ones(3), torch.ones(3)
    b[2] = 1.001
    assert train.fingerprint([a]) != train.fingerprint([b])


def test_bootstrap_interval_of_a_known_sample():
    """Against the exact percentile interval: every one of the 5^5 resamples of a 5-seed sample
    enumerated."""
    ratios = [0.8, 1.1, 1.3, 1.25, 0.95]
    logs = [math.log(r) for r in ratios]
    means = sorted(sum(c) / 5 for c in itertools.product(logs, repeat=5))
    exact_low, exact_high = means[int(0.025 * len(means))], means[int(0.975 * len(means))]
    interval = stats.bootstrap_geometric_mean(ratios)
    assert interval.n == 5
    assert interval.estimate == pytest.approx(math.exp(sum(logs) / 5))
    assert math.log(interval.low) == pytest.approx(exact_low, abs=0.02)
    assert math.log(interval.high) == pytest.approx(exact_high, abs=0.02)
    assert not interval.established  # this sample's interval contains 1
    clear = stats.bootstrap_geometric_mean([1.5, 1.6, 1.4, 1.55])
    assert clear.established and clear.low > 1
    assert stats.bootstrap_geometric_mean([1.2]) is None  # no interval from one pair


def test_time_to_is_the_first_crossing():
    points = ((2, 0.3, 2.0), (4, 0.61, 1.4), (6, 0.55, 1.6), (8, 0.7, 1.1))
    run = {
        "evals": [
            dict(step=s, train_time=0.1 * s, val_acc=acc, val_loss=loss) for s, acc, loss in points
        ]
    }
    assert stats.time_to(run, "val_acc", 0.6) == pytest.approx(0.4)
    assert stats.steps_to(run, "val_acc", 0.6) == 4
    assert stats.time_to(run, "val_loss", 1.5) == pytest.approx(0.4)  # losses from above
    assert stats.time_to(run, "val_acc", 0.9) is None


def test_eval_every_steps_resolves_the_crossing(tmp_path):
    assert (
        run_compare(tmp_path, "--optimizers", "muon", "--seeds", "0", "--eval-every-steps", "3")
        == 0
    )
    run = json.loads((tmp_path / "runs" / "muon_seed0.json").read_text())
    assert [r["step"] for r in run["evals"]] == [3, 6, 9, 12, 15, 16]  # every 3, and the end
    times = [r["train_time"] for r in run["evals"]]
    assert times == sorted(times) and len(set(times)) == len(times)


def test_language_model_end_to_end(tmp_path):
    argv = ["--dataset", "synthetic-text", "--model", "gpt", "--context", "32", "--optimizers",
            "dropmuon", "muon", "--seeds", "0", "--epochs", "1", "--batch-size", "32",
            "--train-size", "2048", "--val-size", "16", "--test-size", "32", "--lr", "0.02",
            "--eval-every-steps", "16", "--loss-targets", "3.0", "2.5", "--log-smoothness",
            "--no-progress", "--output", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    run = json.loads((tmp_path / "runs" / "muon_seed0.json").read_text())
    first, last = run["evals"][0], run["evals"][-1]
    assert {"train_loss", "val_loss", "test_loss"} <= set(last)
    assert last["val_loss"] < first["val_loss"]
    assert len(last["smoothness"]) == len(run["layer_names"])  # logged per layer
    summary = (tmp_path / "summary.md").read_text()
    assert "val loss ≤ 3" in summary and "perplexity" in summary
    assert "## Per-layer smoothness estimates" in summary
    assert (tmp_path / "loss_vs_time.png").stat().st_size > 0
    assert (tmp_path / "smoothness.png").stat().st_size > 0


def test_models_and_datasets_must_match(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--dataset", "synthetic", "--model", "gpt", "--output", str(tmp_path)])
    assert "--model gpt does not go with --dataset synthetic" in capsys.readouterr().err


def test_vit_end_to_end(tmp_path):
    assert run_compare(tmp_path, "--model", "vit", "--optimizers", "dropmuon", "--seeds", "0") == 0
    run = json.loads((tmp_path / "runs" / "dropmuon-uniform_seed0.json").read_text())
    assert len(set(run["cutoffs"])) > 1 and run["evals"][-1]["step"] == 16


def test_max_steps_ends_a_run_and_spans_epoch_shift(tmp_path, monkeypatch):
    seen = {}

    class Recording(train.DropMuon):
        def __init__(self, *args, **kwargs):
            seen["total_steps"] = kwargs.get("total_steps")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(train, "DropMuon", Recording)
    argv = ["--optimizers", "dropmuon:epoch_shift", "--seeds", "0", "--max-steps", "5"]
    assert run_compare(tmp_path, *argv) == 0
    run = json.loads((tmp_path / "runs" / "dropmuon-epoch_shift_seed0.json").read_text())
    assert run["evals"][-1]["step"] == 5 and len(run["cutoffs"]) == 5
    assert seen["total_steps"] == 5
