"""The Muon implementations people already run, as the harness's baselines
(dropmuon.compare.baselines): a 2-step run of each, the error when a package is missing, which
parameters each gives its Muon, and our Muon against Keller Jordan's reference on the same
trajectory."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dropmuon import Muon
from dropmuon.compare import baselines, cli
from dropmuon.compare.models import build_language_model, build_model


def needs(name):
    return pytest.mark.skipif(
        not baselines.available(name),
        reason=f"{baselines.BASELINES[name].package} is not installed (dropmuon[baselines])",
    )


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=needs(name)) for name in baselines.BASELINES]
)
def test_a_two_step_run_of_each_baseline(tmp_path, name):
    argv = ["--dataset", "synthetic", "--optimizers", name, "muon", "--seeds", "0",
            "--max-steps", "2", "--epochs", "1", "--batch-size", "64", "--lr", "0.02",
            "--no-progress", "--output", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    run = json.loads((tmp_path / "runs" / f"{name}_seed0.json").read_text())
    ours = json.loads((tmp_path / "runs" / "muon_seed0.json").read_text())
    assert run["evals"][-1]["step"] == 2 and run["optimizer"] == name
    # Fingerprinted like the others: the same initial weights and batches as the paired run.
    assert run["init_fingerprint"] == ours["init_fingerprint"]
    assert run["order_fingerprint"] == ours["order_fingerprint"]
    assert torch.isfinite(torch.tensor(run["evals"][-1]["running_loss"]))


def test_a_missing_package_is_a_clear_error(monkeypatch):
    real_import = baselines.importlib.import_module

    def without_muon(name, *args):
        if name == "muon":
            raise ImportError("No module named 'muon'")
        return real_import(name, *args)

    monkeypatch.setattr(baselines.importlib, "import_module", without_muon)
    assert not baselines.available("kj-muon")
    with pytest.raises(RuntimeError, match=r'pip install "muon-optimizer==0.1.0"'):
        baselines.build_baseline("kj-muon", nn.Linear(2, 2), None, 0.02)


def test_help_lists_the_baselines(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in baselines.BASELINES:
        assert name in out


def test_hidden_matrices_leave_embeddings_head_and_vectors_to_adamw():
    cnn = build_model("paper-cnn", 1, 10, 28)
    muon, rest = baselines.hidden_matrices(cnn)
    assert [p.dim() for p in muon] == [4, 4, 4]  # the three conv kernels, not the head
    rest_ids = {id(p) for p in rest}
    assert id(cnn.head.weight) in rest_ids and id(cnn.head.bias) in rest_ids
    assert all(p.dim() < 2 for p in rest if p is not cnn.head.weight)
    gpt = build_language_model("gpt", 65, 32)
    muon, rest = baselines.hidden_matrices(gpt)
    ids = {id(p) for p in muon}
    assert id(gpt.token.weight) not in ids and id(gpt.position.weight) not in ids
    assert id(gpt.head.weight) not in ids and all(p.dim() >= 2 for p in muon)
    assert len(muon) + len(rest) == len(list(gpt.parameters()))


# ----------------------------------------------------------------------------------------------
# Parity with Keller Jordan's Muon
# ----------------------------------------------------------------------------------------------

# The options that make our Muon Keller Jordan's SingleDeviceMuonWithAuxAdam: his Muon for the
# hidden matrices, his Adam for the output layer and the vectors (norms={"head": "adamw"},
# fallback="adamw"), his AdamW settings (betas (0.9, 0.95), eps 1e-10, the same weight decay),
# Nesterov, bfloat16 Newton-Schulz with his coefficients (ours by default), and lr scaled by
# sqrt(max(1, rows/cols)) ("original", ours by default; conv kernels are his matrices in the
# (out, in*kh*kw) view, as they are ours).
LR, ADAM_LR, WEIGHT_DECAY, MOMENTUM = 0.02, 3e-4, 0.01, 0.95
# One step's update, relative. Measured: 4.1% (MLP) and 5.9% (CNN); ours with float32 iterates
# (ns_precision="native") is as far from his (3.6%, 5.6%): the gap is his bfloat16 rounding.
# One option changed: 39% or more.
TOLERANCE = 0.08
HARNESS_ARGS = SimpleNamespace(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, adamw_lr=ADAM_LR)


def ours(model, **change):
    options = dict(
        lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY,
        norms={"head": "adamw"}, fallback="adamw", adamw_lr=ADAM_LR, adamw_betas=(0.9, 0.95),
        adamw_eps=1e-10,
    )  # fmt: skip
    return Muon(model, **dict(options, **change))


def keller_jordan(model):
    """His optimizer as the harness builds kj-muon."""
    pytest.importorskip("muon", reason="muon-optimizer is not installed")
    return baselines.build_baseline("kj-muon", model, HARNESS_ARGS, LR)


class MLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)  # 16 x 9: lr scaled by 4/3
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(x)


def pair(make, **change):
    """Our Muon and his on two copies of one model, and each parameter of ours with his
    (his conv kernels are their 2-D originals)."""
    torch.manual_seed(0)
    model_a, model_b = make(), make()
    model_b.load_state_dict(model_a.state_dict())
    opt_a, opt_b = ours(model_a, **change), keller_jordan(model_b)
    his = dict(model_b.named_parameters())
    matched = [
        (p, his.get(name.replace(".weight", ".parametrizations.weight.original"), his.get(name)))
        for name, p in model_a.named_parameters()
    ]
    return (model_a, opt_a), (model_b, opt_b), matched


def step_both(models, data, step):
    x, y = data(step)
    for model, opt in models:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@torch.no_grad()
def take_his_state(opt_a, opt_b, matched):
    """Ours continues from his parameters and optimizer state."""
    for a, b in matched:
        a.copy_(b.reshape(a.shape))
        mine, his = opt_a.state[a], opt_b.state[b]
        if "momentum_buffer" in his:
            mine["momentum_buffer"].copy_(his["momentum_buffer"].reshape(a.shape))
        if "exp_avg" in his:
            mine["exp_avg"].copy_(his["exp_avg"])
            mine["exp_avg_sq"].copy_(his["exp_avg_sq"])
            mine["step"].fill_(his["step"])


def step_gap(make, data, steps, **change) -> float:
    """The largest difference of one step's update, ours vs his from the same parameters and
    state (his), relative to his update (Frobenius norms), over ``steps`` steps of his run."""
    (model_a, opt_a), (model_b, opt_b), matched = pair(make, **change)
    worst = 0.0
    for step in range(steps):
        if step:
            take_his_state(opt_a, opt_b, matched)
        before = [b.detach().clone().reshape(a.shape) for a, b in matched]
        step_both([(model_a, opt_a), (model_b, opt_b)], data, step)
        for (a, b), x0 in zip(matched, before):
            mine, his = a.detach() - x0, b.detach().reshape(a.shape) - x0
            worst = max(worst, float((mine - his).norm() / his.norm()))
    return worst


def final_loss_gap(make, data, steps) -> float:
    """Both run freely for ``steps`` steps: the relative difference of their final losses on a
    held-out batch."""
    (model_a, opt_a), (model_b, opt_b), _ = pair(make)
    for step in range(steps):
        step_both([(model_a, opt_a), (model_b, opt_b)], data, step)
    x, y = data(10_000)
    with torch.no_grad():
        la, lb = (nn.functional.cross_entropy(m(x), y) for m in (model_a, model_b))
    return float((la - lb).abs() / lb)


def mlp_data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(64, 20, generator=g), torch.randint(0, 10, (64,), generator=g)


def cnn_data(step):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)


@pytest.mark.parametrize(("make", "data"), [(MLP, mlp_data), (SmallCNN, cnn_data)])
def test_our_muon_makes_keller_jordans_steps(make, data):
    """From the same parameters and state, each of 12 steps' updates agrees with his within
    bfloat16 Newton-Schulz precision (his iterations round each product to bfloat16
    separately, ours fuse them, as torch.optim.Muon does; his AdamW divides in another order),
    and running freely for 30 steps both reach the same held-out loss within 2%."""
    assert step_gap(make, data, 12) < TOLERANCE
    assert final_loss_gap(make, data, 30) < 0.02


@pytest.mark.parametrize(
    "change", [dict(nesterov=False), dict(adjust_lr_fn="match_rms_adamw"), dict(momentum=0.9)]
)
def test_the_parity_check_sees_a_different_option(change):
    """The same check fails when one option differs: the tolerance above is not loose."""
    assert step_gap(MLP, mlp_data, 12, **change) > 3 * TOLERANCE
