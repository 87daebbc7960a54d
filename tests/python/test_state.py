"""Checkpoints: torch's state layout, weights_only loading, and an exact resume."""

import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn
from training import train_steps

import dropmuon
from dropmuon.compare.models import PaperCNN


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 1, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g)


def make(seed=0, **options):
    torch.manual_seed(seed)
    model = PaperCNN(1, 10, 12, channels=(4, 8, 8))
    options = {**dict(lr=0.02, sampling="uniform", seed=5, fallback="adamw"), **options}
    opt = dropmuon.DropMuon(model, **options)
    return model, opt


def train(model, opt, start, steps, scheduler=None):
    return train_steps(model, opt, batch, steps, start, scheduler)


def save(*objects):
    buffer = io.BytesIO()
    torch.save([o.state_dict() for o in objects], buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(sampling="cost_optimal", smoothness_every=2),
        dict(sampling="epoch_shift", total_steps=12),
    ],
    ids=["uniform", "cost_optimal", "epoch_shift"],
)
def test_resume_is_bit_identical(options):
    k = 6
    model, opt = make(**options)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.7)
    first = train(model, opt, 0, k, sched)
    checkpoint = save(model, opt, sched)
    straight = train(model, opt, k, k, sched)
    expected = [p.detach().clone() for p in model.parameters()]

    model, opt = make(seed=123, **options)  # different init: everything must come from the file
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.7)
    model_state, opt_state, sched_state = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    assert opt.step_count == k
    resumed = train(model, opt, k, k, sched)
    assert resumed == straight
    assert len(set(first + straight)) > 1  # the cutoffs really varied
    for a, b in zip(model.parameters(), expected):
        assert torch.equal(a, b)


def test_state_dict_layout():
    model, opt = make()
    train(model, opt, 0, 4)
    state = opt.state_dict()
    keys = {k for s in state["state"].values() for k in s}
    assert "momentum_buffer" in keys and {"exp_avg", "exp_avg_sq", "step"} <= keys
    extra = state["param_groups"][0]["dropmuon"]
    assert extra["step"] == 4 and extra["sampler"]["seed"] == 5
    assert sum(extra["update_counts"]) >= 4
    torch.load(save(opt), weights_only=True)


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("built_from", ["module", "list"])
def test_a_dropmuon_0_1_checkpoint_resumes_its_trajectory(built_from, version):
    """Checkpoints written by dropmuon 0.1 (one param group per layer; fixtures/
    make_v2_checkpoints.py) load into today's optimizer, whose groups are the user's (one here),
    and continue the very trajectory 0.1 continued them on. Version 1 had the section at the
    top level and no state for parameters never updated (they start from zeros)."""
    saved = torch.load(FIXTURES / "v2_checkpoints.pt", weights_only=True)[built_from]
    state = copy.deepcopy(saved["optimizer"])
    if version == 1:
        state["dropmuon"] = state["param_groups"][0].pop("dropmuon")
        state["dropmuon"]["version"] = 1
        for group in state["param_groups"]:
            if state["dropmuon"]["update_counts"][group["layer"]] == 0:
                for key in group["params"]:
                    state["state"].pop(key)
    model = v2_net()
    model.load_state_dict(saved["model"])
    params = model.parameters() if built_from == "list" else model
    opt = dropmuon.DropMuon(params, lr=0.05, seed=4, fallback="adamw", ns_precision="native")
    opt.load_state_dict(state)
    assert len(opt.param_groups) == 1 and "dropmuon" not in opt.param_groups[0]
    assert "layer" not in opt.param_groups[0] and opt.step_count == 3
    for step in range(3, 6):
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.update_counts == saved["update_counts"]
    for a, b in zip(model.parameters(), saved["after"]):
        assert torch.equal(a, b)


def test_a_dropmuon_0_1_checkpoint_with_unequal_groups_cannot_merge():
    state = torch.load(FIXTURES / "v2_checkpoints.pt", weights_only=True)["module"]["optimizer"]
    state["param_groups"][1]["lr"] = 0.5
    opt = dropmuon.DropMuon(v2_net(), lr=0.05, seed=4, fallback="adamw")
    with pytest.raises(ValueError, match="param groups with different options"):
        opt.load_state_dict(state)


def v2_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def test_load_rejects_another_model_and_changes_nothing():
    model, opt = make()
    train(model, opt, 0, 2)
    other_model = nn.Sequential(nn.Flatten(), nn.Linear(144, 10))
    other = dropmuon.DropMuon(other_model)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="different model or partition"):
        opt.load_state_dict(other.state_dict())
    after = opt.state_dict()
    assert after["param_groups"][0]["dropmuon"] == before["param_groups"][0]["dropmuon"]
    for key in before["state"]:
        for name, value in before["state"][key].items():
            assert torch.equal(value, after["state"][key][name])

    _, sign_opt = make(fallback="sign")
    with pytest.raises(ValueError, match="norm 'sign' in the checkpoint and 'adamw' here"):
        opt.load_state_dict(sign_opt.state_dict())
    with pytest.raises(ValueError, match="not a DropMuon checkpoint"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_load_before_the_first_forward_adopts_the_checkpoint_order():
    model, opt = make()
    train(model, opt, 0, 3)
    state = opt.state_dict()
    model2, opt2 = make()
    opt2.load_state_dict(state)
    assert opt2.layer_names() == opt.layer_names()
    assert opt2.active_layers == opt.active_layers
    requires = [p.requires_grad for p in model2.parameters()]
    assert requires == [p.requires_grad for p in model.parameters()]


def test_a_round_trip_before_the_first_forward_keeps_the_first_forward_order():
    """accelerate (HF Trainer) calls load_state_dict(state_dict()) before training: that must
    not replace the first forward's layer order by the registration order."""

    class Reversed(nn.Module):  # registered a, b; run b then a
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(torch.tanh(self.b(x)))

    model = Reversed()
    opt = dropmuon.DropMuon(model, lr=0.02, sampling="full")
    opt.load_state_dict(opt.state_dict())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert opt.layer_order == "first forward"
    assert opt.layer_names() == ["b", "a"]
    # A checkpoint written after the first forward still replaces a pending trace.
    again = dropmuon.DropMuon(Reversed(), lr=0.02, sampling="full")
    again.load_state_dict(opt.state_dict())
    assert again.layer_order == "checkpoint" and again.layer_names() == ["b", "a"]


def test_dcp_checkpoint_of_an_unsharded_model_resumes_bit_for_bit(tmp_path):
    """torch.distributed.checkpoint in one process: the state made at construction keeps
    get_optimizer_state_dict from stepping a fresh optimizer, and the section survives."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def states(model, opt):
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}

    model, opt = make()
    train(model, opt, 0, 3)
    dcp.save(states(model, opt), checkpoint_id=str(tmp_path))
    straight = train(model, opt, 3, 3)
    expected = [p.detach().clone() for p in model.parameters()]

    model, opt = make(seed=123)
    state = states(model, opt)
    assert opt.step_count == 0 and sum(opt.update_counts) == 0  # nothing stepped
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert opt.step_count == 3
    assert train(model, opt, 3, 3) == straight
    for a, b in zip(model.parameters(), expected):
        assert torch.equal(a, b)
