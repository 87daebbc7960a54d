"""torch.optim's generic optimizer checks (those torch's own test suite runs on
torch.optim.Muon, in our words), on dropmuon.Muon and dropmuon.DropMuon with the seven
configurations torch tests Muon with. DropMuon here gets a parameter list, whose layers are the
modules the first forward runs (one per tensor when gradients are set by hand), so a one-matrix
model is updated at every step."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import dropmuon

CONFIGS = {
    "default": {},
    "lr": {"lr": 0.01},
    "tensor-lr": {"lr": torch.tensor(0.001)},
    "weight-decay": {"weight_decay": 0.2},
    "momentum": {"momentum": 0.8},
    "ns-steps": {"ns_steps": 6},
    "ns-coefficients": {"ns_coefficients": (3.4, -4.7, 2.0)},
}
CLASSES = {"Muon": dropmuon.Muon, "DropMuon": dropmuon.DropMuon}


def config(name):
    return copy.deepcopy(CONFIGS[name])


def quadratic(w, x):
    return (w @ x).square().sum()


@pytest.fixture(params=list(CLASSES))
def cls(request):
    return CLASSES[request.param]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("contiguous", [True, False])
def test_goes_right_direction_with_schedulers(cls, name, contiguous):
    w = torch.randn(10, 5) if contiguous else torch.randn(10, 5, 2)[..., 0]
    w = nn.Parameter(w) if contiguous else w.requires_grad_()
    x = torch.randn(5)
    opt = cls([w], **config(name))
    schedulers = [
        torch.optim.lr_scheduler.StepLR(opt, gamma=0.9, step_size=10),
        torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
    ]
    initial = quadratic(w, x).item()
    for _ in range(20):
        opt.zero_grad()
        loss = quadratic(w, x)
        loss.backward()
        opt.step()
        schedulers[0].step()
        schedulers[1].step(loss.item())
    assert quadratic(w, x).item() < initial


def test_param_groups_with_schedulers_and_a_closure(cls):
    w1, w2, x = nn.Parameter(torch.randn(10, 5)), nn.Parameter(torch.randn(10, 5)), torch.randn(5)
    opt = cls([{"params": [w1]}, {"params": [w2], "lr": 0.01}])
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)

    def closure():
        opt.zero_grad()
        loss = (w1 @ x + w2 @ x).square().sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20):
        loss = opt.step(closure)  # the closure's loss comes back
        plateau.step(loss.item())
    assert closure().item() < initial


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_tensor_lr_matches_float_lr(cls, shape):
    w = nn.Parameter(torch.randn(10, 5))
    w2 = nn.Parameter(w.detach().clone())
    x = torch.randn(5)
    a, b = cls([w], lr=1e-3), cls([w2], lr=torch.tensor(1e-3).reshape(shape))
    for _ in range(5):
        for opt, p in ((a, w), (b, w2)):
            opt.zero_grad()
            quadratic(p, x).backward()
            opt.step()
        torch.testing.assert_close(w, w2)


def test_per_group_lr_and_weight_decay(cls):
    w, irrelevant, x = (
        nn.Parameter(torch.randn(10, 5)),
        nn.Parameter(torch.randn(2, 2)),
        torch.randn(5),
    )
    opt = cls([{"params": [w], "lr": 1e-3}, {"params": [irrelevant]}], lr=1e-28)
    start = irrelevant.detach().clone()
    initial = quadratic(w, x).item()
    for _ in range(20):
        opt.zero_grad()
        quadratic(w, x).backward()
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step()
    assert quadratic(w, x).item() < initial
    torch.testing.assert_close(irrelevant, start)


def test_zero_gradients_without_weight_decay_change_nothing(cls):
    for name in CONFIGS:
        p = torch.randn(5, 1, requires_grad=True)
        start = p.detach().clone()
        opt = cls([p], **dict(config(name), weight_decay=0.0))
        p.grad = torch.zeros_like(p)
        opt.step(lambda: None)
        assert torch.equal(p, start), name


def test_gradients_are_never_written(cls):
    p = torch.randn(5, 1, requires_grad=True)
    p.grad = torch.rand_like(p)
    version = p.grad._version
    opt = cls([p])
    for _ in range(5):
        opt.step(lambda: None)
        assert p.grad._version == version


def test_repr_of_every_config(cls):
    for name in CONFIGS:
        assert "Parameter Group 0" in repr(cls([nn.Parameter(torch.randn(2, 3))], **config(name)))


@pytest.mark.parametrize("named", [False, True])
def test_state_dict_round_trip_continues_identically(cls, named):
    w, x = nn.Parameter(torch.randn(2, 3)), torch.randn(3)

    def run(opt, p):
        opt.zero_grad()
        quadratic(p, x).backward()
        opt.step()

    a = cls([("w", w)] if named else [w], lr=0.01)
    for _ in range(10):
        run(a, w)
    w2 = nn.Parameter(w.detach().clone())
    b = cls([w2], lr=0.01)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _ in range(10):
        run(a, w)
        run(b, w2)
        torch.testing.assert_close(w, w2)
    sa, sb = a.state_dict(), b.state_dict()
    for s in (sa, sb):
        s["param_groups"][0].pop("param_names", None)
    assert repr(sa) == repr(sb)


def test_older_state_dicts_without_new_group_keys_load(cls):
    model = nn.Linear(10, 4, bias=False)
    opt = cls(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        model(torch.rand(10)).sum().backward()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    for key in ("ns_precision", "radius", "L0", "L1", "adamw_eps"):  # options added after 0.1
        state["param_groups"][0].pop(key)
    opt.load_state_dict(state)
    assert opt.param_groups[0]["ns_precision"] == "bfloat16"
    opt.zero_grad()
    model(torch.rand(10)).sum().backward()
    opt.step()


@pytest.mark.parametrize("named", [False, True])
def test_save_and_load_with_weights_only(cls, named):
    w = nn.Parameter(torch.randn(2, 3))
    opt = cls([("w", w)] if named else [w])

    def closure():
        opt.zero_grad()
        loss = quadratic(w, torch.randn(3))
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    for weights_only in (False, True):
        buffer.seek(0)
        assert repr(torch.load(buffer, weights_only=weights_only)) == repr(opt.state_dict())


def test_state_dict_and_load_hooks_run_as_torch_runs_them(cls):
    opt = cls([torch.rand(2, 3, requires_grad=True)], lr=0.001)
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))
    assert opt.state_dict()["state"]["test"] == 1
    opt.register_state_dict_post_hook(lambda o, sd: sd["state"].pop("test") and sd)
    assert "test" not in opt.state_dict()["state"]

    state = opt.state_dict()

    def set_lr(o, sd):
        sd["param_groups"][0]["lr"] = 0.002

    def replace(o, sd):
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.003
        return sd

    seen = []
    opt.register_load_state_dict_pre_hook(set_lr)
    opt.register_load_state_dict_pre_hook(replace, prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o.param_groups[0]["lr"]))
    opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.002 and seen == [0.002]


def test_step_hooks_run_once_each_in_torch_order(cls):
    p = torch.tensor([[1.0, 1.0]])
    opt, sgd = cls([p]), torch.optim.SGD([p], lr=0.1)
    order = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: order.append(0)),
        opt.register_step_pre_hook(lambda o, a, k: order.append(1)),
        opt.register_step_post_hook(lambda o, a, k: order.append(2)),
        register_optimizer_step_post_hook(lambda o, a, k: order.append(3)),
    ]
    opt.step()
    sgd.step()
    assert order == [0, 1, 2, 3, 0, 3]
    for handle in handles:
        handle.remove()
    opt.step()
    assert order == [0, 1, 2, 3, 0, 3]


def test_every_state_entry_is_filled_after_a_step(cls):
    model = nn.Linear(5, 5, bias=False)
    opt = cls(model.parameters())
    model(torch.randn(5)).sum().backward()
    opt.step()
    assert opt.state and all(opt.state[p] for p in model.parameters())


def test_a_pickled_optimizer_of_plain_tensors_steps_like_the_original(cls):
    w = nn.Parameter(torch.randn(4, 3))
    opt = cls([w], lr=0.02)
    w2, opt2 = pickle.loads(pickle.dumps((w, opt)))
    for p in (w, w2):
        p.grad = torch.ones_like(p)
    opt.step()
    opt2.step()
    assert torch.equal(w, w2)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda c: c(nn.Parameter(torch.randn(1, 1))), TypeError, "should be an iterable"),
        (
            lambda c: c([{"params": [nn.Parameter(torch.randn(1, 1))]}] * 2),
            ValueError,
            "some parameters appear in more than one parameter group",
        ),
        (
            lambda c: c(None, lr=torch.tensor([0.001, 0.001])),
            ValueError,
            "Tensor lr must be 1-element",
        ),
        (
            lambda c: c([("w", nn.Parameter(torch.randn(1, 1))), nn.Parameter(torch.randn(1, 1))]),
            ValueError,
            "all optimizer params should be with/without names",
        ),
        (
            lambda c: c([torch.randn(2, 3)], adjust_lr_fn="arbitrary"),
            ValueError,
            "Adjust learning rate function arbitrary is not supported",
        ),
    ],
)
def test_errors_with_torchs_messages(cls, make, error, message):
    with pytest.raises(error, match=message):
        make(cls)
