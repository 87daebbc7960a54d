"""The main job end to end on the synthetic set, its errors, and interrupted runs; the
harness's separation from the library."""

import json
import subprocess
import sys

import pytest
import torch

from dropmuon.compare import cli, data, train


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
    assert len(run["epochs"]) == 2 and run["epochs"][-1]["step"] == 16
    assert {"train_acc", "test_acc", "train_time", "forward_time"} <= set(run["epochs"][0])
    summary = (tmp_path / "summary.md").read_text()
    assert "## Time to target accuracy" in summary and "## Where Drop-Muon loses" in summary
    assert "dropmuon:epoch_shift" in summary and "torch-muon" in summary
    assert "# synthetic, paper-cnn" in capsys.readouterr().out
    csv_rows = (tmp_path / "runs.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 10 * 2


def test_dropmuon_runs_record_their_cutoffs(tmp_path):
    assert run_compare(tmp_path, "--optimizers", "dropmuon", "--seeds", "3") == 0
    run = json.loads((tmp_path / "runs" / "dropmuon-uniform_seed3.json").read_text())
    assert len(run["cutoffs"]) == 16 and len(set(run["cutoffs"])) > 1
    assert sum(run["update_counts"]) > 16


def test_train_and_test_subsets_are_fixed_and_recorded(tmp_path):
    assert (
        run_compare(tmp_path, "--optimizers", "muon", "--train-size", "384", "--test-size", "100")
        == 0
    )
    first = json.loads((tmp_path / "runs" / "muon_seed0.json").read_text())
    assert first["meta"]["train_size"] == 384 and first["meta"]["test_size"] == 100
    assert first["steps_per_epoch"] == 3  # 384 images at batch 128
    # Test accuracy is counted over those 100 images: a multiple of 1/100.
    for record in first["epochs"]:
        assert abs(record["test_acc"] * 100 - round(record["test_acc"] * 100)) < 1e-9
    x, y = cli.fixed_subset(torch.arange(10.0), torch.arange(10), 4)
    again = cli.fixed_subset(torch.arange(10.0), torch.arange(10), 4)
    assert torch.equal(x, again[0]) and torch.equal(x.long(), y)


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
    real = cli.train_run
    calls = []

    def interrupt_third(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 3 + 2:  # 2 warm-up calls, then two finished runs, then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "train_run", interrupt_third)
    assert run_compare(tmp_path, "--optimizers", "dropmuon", "muon") == 130
    runs = sorted(p.name for p in (tmp_path / "runs").glob("*"))
    assert runs == ["dropmuon-uniform_seed0.json", "muon_seed0.json"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| muon |" in summary and "| dropmuon:uniform |" in summary
    for path in (tmp_path / "runs").glob("*.json"):
        json.loads(path.read_text())  # complete files


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
    args.lr = cli.parse_lr(["0.1"])
    opt = train.build_optimizer(train.OptimizerSpec.parse("torch-muon"), model, args, 0, 10)
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
