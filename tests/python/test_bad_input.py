"""Bad input, one case each, against the behaviour the DropMuon docstring promises: non-finite,
zero, sparse and mismatched gradients; parameters of every rank, empty, complex, sparse or
float16; invalid hyperparameters, at construction and written into a group later; checkpoints
from another model or partition, truncated, or not DropMuon's. Where an error is promised
"before anything changes", everything a step or a load could touch is compared bit for bit.

The invalid-argument cases already in test_optimizer.py::test_invalid_arguments are not
repeated here."""

import copy
import io
import math
import re
import warnings

import pytest
import torch
from torch import Tensor, nn

import dropmuon

NAN, INF = float("nan"), float("inf")


def mlp(seed=0, widths=(6, 8, 8, 3), bias=True):
    """Linear layers at indices 0, 2, 4, ...: layer i is module str(2 * i)."""
    torch.manual_seed(seed)
    blocks = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        blocks += [nn.Linear(n_in, n_out, bias=bias), nn.Tanh()]
    return nn.Sequential(*blocks[:-1])


def backward(model, opt, step):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def train(model, opt, steps, start=0):
    cutoffs = []
    for s in range(start, start + steps):
        cutoffs.append(opt.cutoff)
        backward(model, opt, s)
        opt.step()
    return cutoffs


def everything(model, opt):
    """A deep copy of all that a step or a load may change."""
    return dict(
        params=[p.detach().clone() for p in model.parameters()],
        grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        # state tensors, param_groups, and the dropmuon section: step, sampler, counts, smoothness
        state=copy.deepcopy(opt.state_dict()),
        cutoff=opt.cutoff,
        active=opt.active_layers,
        skipped=list(opt.skipped_nonfinite),
        smoothness=list(opt.smoothness),
    )


def assert_same(a, b, path="snapshot"):
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), path
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


# --------------------------------------------------------------------------------------------
# Non-finite gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("target", ["cutoff_weight", "head_bias"])
def test_nonfinite_gradient_raises_and_changes_nothing(value, target):
    model, reference = mlp(), mlp()
    opt = dropmuon.DropMuon(model, lr=0.05, seed=3)
    ref_opt = dropmuon.DropMuon(reference, lr=0.05, seed=3)
    train(model, opt, 2)
    layer = opt.cutoff if target == "cutoff_weight" else 2
    name = f"{2 * layer}.{'weight' if target == 'cutoff_weight' else 'bias'}"
    backward(model, opt, 2)
    dict(model.named_parameters())[name].grad.view(-1)[1] = value
    before = everything(model, opt)
    message = f"non-finite gradient in parameter '{name}' (layer {layer}, {2 * layer})"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        opt.step()
    assert_same(before, everything(model, opt))

    # The retried step is the step the failed one would have been.
    train(model, opt, 2, start=2)
    train(reference, ref_opt, 4)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_nonfinite_skip_leaves_that_layer_and_updates_the_others(value):
    model = mlp()
    opt = dropmuon.DropMuon(model, lr=0.05, weight_decay=0.1, sampling="full", nonfinite="skip")
    train(model, opt, 1)
    backward(model, opt, 1)
    model[2].weight.grad[0, 0] = value  # layer 1; its bias gradient stays finite
    before = everything(model, opt)
    opt.step()
    after = everything(model, opt)
    layer_params = {0: [0, 1], 1: [2, 3], 2: [4, 5]}
    for i in layer_params[1]:
        assert torch.equal(after["params"][i], before["params"][i])
        saved, now = before["state"]["state"][i], after["state"]["state"][i]
        assert saved.keys() == now.keys()  # a momentum buffer, or AdamW's moments
        assert all(torch.equal(saved[k], now[k]) for k in saved)
    for i in layer_params[0] + layer_params[2]:
        assert not torch.equal(after["params"][i], before["params"][i])
        assert torch.isfinite(after["params"][i]).all()
    assert opt.skipped_nonfinite == [0, 1, 0]
    assert opt.update_counts == [2, 1, 2]
    assert opt.step_count == 2
    train(model, opt, 1, start=2)  # finite again: the layer trains on
    assert opt.update_counts == [3, 2, 3] and opt.skipped_nonfinite == [0, 1, 0]


# --------------------------------------------------------------------------------------------
# Zero gradients: nothing but weight decay moves
# --------------------------------------------------------------------------------------------

ZERO_GRAD_CASES = {
    "spectral-sign": dict(),
    "native": dict(ns_precision="native"),
    "column-row": dict(norms={"matrix": "column", "head": "row"}),
    "frobenius": dict(norms={"matrix": "frobenius", "head": "frobenius"}),
    "adamw": dict(fallback="adamw"),
    "adaptive-L0-0": dict(radius="adaptive", L0=0.0, L1=1.0),
    "smoothness": dict(estimate_smoothness=True, smoothness_every=1),
}


@pytest.mark.parametrize("weight_decay", [0.1, 0.0], ids=["wd", "no-wd"])
@pytest.mark.parametrize("case", list(ZERO_GRAD_CASES))
def test_zero_gradients_change_nothing_but_weight_decay(case, weight_decay):
    lr = 0.05
    model = mlp()
    opt = dropmuon.DropMuon(
        model, lr=lr, weight_decay=weight_decay, sampling="full", **ZERO_GRAD_CASES[case]
    )
    backward(model, opt, 0)  # the first forward orders the layers
    for s in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b * (1 - lr * weight_decay)), s
    for state in opt.state.values():
        assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, Tensor))
    assert all(v is None or math.isfinite(v) for v in opt.smoothness)


# --------------------------------------------------------------------------------------------
# Parameters of every rank, empty ones, and the ones refused
# --------------------------------------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))  # 0-D

    def forward(self, x):
        return x * self.scale


class EveryRank(nn.Module):
    """0-D to 5-D parameters, and an empty weight (nn.Linear(0, 4))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv3 = nn.Conv3d(1, 2, 2)
        self.conv2 = nn.Conv2d(2, 3, 2)
        self.conv1 = nn.Conv1d(3, 4, 2)
        self.scale = Scale()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
            self.empty = nn.Linear(0, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.conv3(x).mean(2)  # (n, 2, 3, 3)
        h = self.conv2(h).flatten(2)  # (n, 3, 4)
        h = self.scale(self.conv1(h).mean(2))  # (n, 4)
        e = self.empty(x.new_zeros(x.shape[0], 0))  # its bias only
        return self.head(torch.cat([h, e], 1))


@pytest.mark.parametrize("fallback", ["sign", "adamw"])
def test_every_rank_is_routed_as_documented_and_trains(fallback):
    model = EveryRank()
    opt = dropmuon.DropMuon(model, lr=0.05, sampling="full", fallback=fallback)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for s in range(2):
        opt.zero_grad()
        x = torch.randn(5, 1, 4, 4, 4, generator=torch.Generator().manual_seed(s))
        model(x).square().mean().backward()
        opt.step()
    table = dropmuon.describe(opt)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in opt.param_groups:
        for p in group["params"]:
            norm, name = opt.norm_of(p), names[id(p)]
            seen.add(p.dim())
            if p.dim() < 2:
                assert norm == fallback, name
            else:
                assert norm == "spectral", name
                rows, cols = p.shape[0], p.numel() // p.shape[0]
                assert f"{name} {tuple(p.shape)} spectral as {rows}x{cols}" in table
            assert torch.isfinite(p).all(), name
            if p.numel():
                assert not torch.equal(p, start[name]), name
            else:
                assert p.shape == start[name].shape == (4, 0)
    assert seen == {0, 1, 2, 3, 4, 5}
    assert opt.layer_names() == ["conv3", "conv2", "conv1", "scale", "empty", "head"]


@pytest.mark.parametrize(
    "norm", ["auto", "spectral", "sign", "column", "row", "frobenius", "adamw"]
)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (3, 0, 2, 2)], ids=str)
def test_zero_size_parameters_are_accepted_and_left_alone(shape, norm):
    empty = nn.Parameter(torch.empty(shape))
    other = nn.Parameter(torch.randn(4, 3))
    groups = [{"params": [("empty", empty)], "norm": norm}, {"params": [("other", other)]}]
    opt = dropmuon.DropMuon(groups, lr=0.05, sampling="full")
    start = other.detach().clone()
    for _ in range(2):
        empty.grad = torch.empty(shape)
        other.grad = torch.randn(4, 3)
        opt.step()
    assert empty.shape == shape and empty.dtype == torch.float32
    assert all(v.shape in (shape, ()) for v in opt.state[empty].values())
    assert torch.isfinite(other).all() and not torch.equal(other, start)
    assert opt.update_counts == [2, 2]


def named(p, name="w"):
    return [(name, nn.Parameter(p))]


@pytest.mark.parametrize(
    "params, options, message",
    [
        (
            lambda: named(torch.randn(4, 3, dtype=torch.complex64)),
            {},
            "DropMuon does not support complex parameters (w, torch.complex64)",
        ),
        (
            lambda: named(torch.randn(4, dtype=torch.complex128)),
            dict(fallback="adamw"),
            "DropMuon does not support complex parameters (w, torch.complex128)",
        ),
        (
            lambda: named(torch.randn(4, 3).to_sparse()),
            {},
            "DropMuon does not support torch.sparse_coo parameters (w)",
        ),
        (
            lambda: named(torch.randn(4, 3).to_sparse_csr()),
            {},
            "DropMuon does not support torch.sparse_csr parameters (w)",
        ),
        (
            lambda: named(torch.randn(4, 3, dtype=torch.float16)),
            {},
            "DropMuon's spectral update supports float32, float64 and bfloat16 parameters; "
            "w is torch.float16",
        ),
        (
            lambda: named(torch.randn(4, dtype=torch.float16)),
            dict(fallback="sign"),
            "DropMuon's sign update supports float32, float64 and bfloat16 parameters; "
            "w is torch.float16",
        ),
        (
            lambda: named(torch.randn(4, 3, dtype=torch.float16)),
            dict(norms={"head": "frobenius"}),
            "DropMuon's frobenius update supports",
        ),
    ],
    ids=["complex", "complex-adamw", "sparse-coo", "sparse-csr", "fp16", "fp16-sign", "fp16-frob"],
)
def test_unsupported_parameters_are_refused_at_construction(params, options, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta state"
        params = params()
    with pytest.raises(ValueError, match=re.escape(message)):
        dropmuon.DropMuon(params, **options)


@pytest.mark.parametrize("build", ["module", "param-list"])
def test_a_refused_construction_leaves_the_model_as_it_was(build):
    """No layer frozen and no forward hook left behind when a parameter is refused."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[1].weight.data = model[1].weight.data.half()  # no kernel for float16 matrices
    with pytest.raises(ValueError, match="float16"):
        dropmuon.DropMuon(model if build == "module" else list(model.parameters()))
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_adamw_vectors_take_any_float(dtype):
    vector = nn.Parameter(torch.randn(5, dtype=dtype))
    matrix = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = dropmuon.DropMuon([vector, matrix], lr=0.01, sampling="full", fallback="adamw")
    start = vector.detach().clone()
    vector.grad, matrix.grad = torch.randn_like(vector), torch.randn_like(matrix)
    opt.step()
    assert vector.dtype == dtype and torch.isfinite(vector).all()
    assert not torch.equal(vector, start)
    assert opt.norm_of(vector) == "adamw"


# --------------------------------------------------------------------------------------------
# Gradients the update cannot use: refused at step, before anything changes
# --------------------------------------------------------------------------------------------


def test_sparse_gradient_raises_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6, sparse=True), nn.Linear(6, 3))
    opt = dropmuon.DropMuon(model, lr=0.05, sampling="full")
    tokens = torch.tensor([1, 2, 5])
    model(tokens).square().sum().backward()
    model[0].weight.grad = None  # a step without the embedding: momentum state for the head
    opt.step()
    opt.zero_grad()
    model(tokens).square().sum().backward()
    assert model[0].weight.grad.is_sparse
    before = everything(model, opt)
    with pytest.raises(
        RuntimeError, match=re.escape("does not support sparse gradients (0.weight)")
    ):
        opt.step()
    assert_same(before, everything(model, opt))


@pytest.mark.parametrize(
    "grad, shown",
    [
        (torch.zeros(8, 6, dtype=torch.float64), "torch.float64 (8, 6)"),
        (torch.zeros(8, 6, dtype=torch.bfloat16), "torch.bfloat16 (8, 6)"),
        (torch.zeros(6, 8), "torch.float32 (6, 8)"),
        (torch.zeros(48), "torch.float32 (48,)"),
    ],
    ids=["fp64", "bf16", "transposed", "flat"],
)
def test_gradient_of_wrong_dtype_or_shape_raises_and_changes_nothing(grad, shown):
    model = mlp()
    opt = dropmuon.DropMuon(model, lr=0.05, sampling="full")
    train(model, opt, 1)
    backward(model, opt, 1)
    model[0].weight.grad.data = grad  # autograd's own checks refuse `.grad = grad`
    before = everything(model, opt)
    message = (
        f"the gradient of 0.weight is {shown} on cpu, the parameter torch.float32 (8, 6) on "
        "cpu: they must match"
    )
    with pytest.raises(RuntimeError, match=re.escape(message)):
        opt.step()
    assert_same(before, everything(model, opt))


# --------------------------------------------------------------------------------------------
# Invalid hyperparameters (test_optimizer.py::test_invalid_arguments has the others)
# --------------------------------------------------------------------------------------------

INVALID_CASES = [
    (dict(lr=INF), "Learning rate should be finite but is: inf"),
    (dict(lr=NAN), "Learning rate should be >= 0 but is: nan"),
    (dict(lr=torch.tensor(INF)), "Learning rate should be finite but is: inf"),
    (dict(momentum=NAN), "momentum should be >= 0 but is: nan"),
    (dict(weight_decay=INF), "weight decay should be finite but is: inf"),
    (dict(weight_decay=NAN), "weight decay should be >= 0 but is: nan"),
    (dict(eps=INF), "Invalid epsilon value: inf"),
    (dict(eps=NAN), "Invalid epsilon value: nan"),
    (dict(ns_steps=2.5), "ns_steps must be a non-negative int, got 2.5"),
    (
        dict(ns_coefficients=[(3.0, -3.2, 1.2), (1.5, -0.5, 0.0)], ns_steps=3),
        "ns_steps=3 does not match the 2 triples in ns_coefficients",
    ),
    (dict(ns_coefficients=(INF, -1.0, 0.5)), "ns_coefficients must be finite"),
    (dict(ns_coefficients=[]), "ns_coefficients must be a triple or a list of triples"),
    (
        dict(ns_coefficients=[(3.0, -3.2, 1.2), (1.5, -0.5)], ns_steps=None),
        "ns_coefficients must be a triple or a list of triples",
    ),
    (dict(ns_coefficients=(3.0, -3.2)), "ns_coefficients must be a triple or a list of triples"),
    (
        dict(ns_coefficients=(3.0, -3.2, 1.2, 0.5)),
        "ns_coefficients must be a triple or a list of triples",
    ),
    (dict(L0=-1.0), "L0 and L1 must be finite and >= 0 with L0 + L1 > 0, got L0=-1.0, L1=0.0"),
    (dict(L1=-0.5), "L0 and L1 must be finite and >= 0 with L0 + L1 > 0, got L0=1.0, L1=-0.5"),
    (dict(L0=INF), "L0 and L1 must be finite"),
    (dict(L0=0.0), "L0 and L1 must be finite and >= 0 with L0 + L1 > 0, got L0=0.0, L1=0.0"),
    (dict(adamw_betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    (dict(adamw_betas=(-0.1, 0.9)), "Invalid beta parameter at index 0: -0.1"),
    (dict(adamw_betas=(0.9, NAN)), "Invalid beta parameter at index 1: nan"),
    (dict(adamw_betas=(0.9,)), "adamw_betas must be a pair (beta1, beta2), got (0.9,)"),
    (dict(adamw_eps=INF), "Invalid epsilon value: inf"),
    (dict(adamw_lr=-0.1), "Invalid learning rate: -0.1"),
    (dict(adamw_lr=INF), "Invalid learning rate: inf"),
    (dict(lr=0.0, adamw_lr=0.01), "adamw_lr is kept as a ratio to lr, which needs lr > 0"),
    (dict(sampling=[NAN, 0.5, 0.5]), "probabilities must be finite and >= 0"),
    (dict(sampling=[INF, 0.0, 0.0]), "probabilities must be finite and >= 0"),
    (dict(sampling=torch.tensor([0.2, 0.2, 0.2])), "probabilities must sum to 1"),
    (dict(sampling="custom"), "sampling='custom' needs probabilities (one per layer)"),
    (dict(sampling=3), "sampling must be a name, a list of cutoff probabilities, or an object"),
    (dict(sampling="tau_nice", tau=0), "tau_nice needs an int tau in [1, 3], got 0"),
    (dict(sampling="tau_nice", tau=2.0), "tau_nice needs an int tau in [1, 3], got 2.0"),
    (dict(sampling="epoch_shift", shift_strength=-1.0), "shift_strength must be finite"),
    (dict(sampling="epoch_shift", shift_strength=NAN), "shift_strength must be finite"),
    (dict(seed=2**63), "seed must be an int in [0, 2**63)"),
    (dict(seed=1.0), "seed must be an int in [0, 2**63)"),
    (dict(total_steps=2.5), "total_steps must be a positive int, got 2.5"),
    (dict(smoothness_beta=-0.1), "smoothness_beta must be in [0, 1), got -0.1"),
    (dict(nonfinite=None), "nonfinite must be 'raise' or 'skip', got None"),
]


def kwargs_id(case):
    kwargs = (case.values if hasattr(case, "values") else case)[0]
    return ",".join(f"{key}={value!r}" for key, value in kwargs.items())


@pytest.mark.parametrize("kwargs, message", INVALID_CASES, ids=map(kwargs_id, INVALID_CASES))
def test_invalid_hyperparameter_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dropmuon.DropMuon(mlp(), **kwargs)


@pytest.mark.parametrize(
    "group, message",
    [
        (dict(lr=-0.1), "Learning rate should be >= 0 but is: -0.1"),
        (dict(weight_decay=NAN), "weight decay should be >= 0 but is: nan"),
        (dict(norm="nuclear"), "'norm' is 'nuclear'"),
        (dict(ns_steps=-2), "ns_steps must be a non-negative int, got -2"),
        (dict(layer="head"), "'layer' must be an int, got 'head'"),
        (dict(layer=True), "'layer' must be an int, got True"),
    ],
)
def test_invalid_param_group_override_is_a_value_error(group, message):
    model = mlp()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    groups[1].update(group)
    if "layer" in group:
        groups[0]["layer"] = 0
    with pytest.raises(ValueError, match=re.escape(message)):
        dropmuon.DropMuon(groups)


LATER_CASES = [
    ("lr", -1.0, "Learning rate should be >= 0 but is: -1.0"),
    ("lr", INF, "Learning rate should be finite but is: inf"),
    ("lr", NAN, "Learning rate should be >= 0 but is: nan"),
    ("lr", torch.tensor([0.1, 0.2]), "Tensor lr must be 1-element"),
    ("momentum", 1.5, "momentum should be <= 1 but is: 1.5"),
    ("weight_decay", -0.1, "weight decay should be >= 0 but is: -0.1"),
    ("eps", -1.0, "Invalid epsilon value: -1.0"),
    ("L0", -1.0, "L0 and L1 must be finite"),
    ("betas", (1.0, 0.9), "Invalid beta parameter at index 0: 1.0"),
    ("adamw_eps", INF, "Invalid epsilon value: inf"),
    ("radius", "auto", "radius must be 'fixed' or 'adaptive', got 'auto'"),
    ("ns_precision", "fp8", "ns_precision must be 'native' or 'bfloat16', got 'fp8'"),
    ("adjust_lr_fn", "sqrt", "Adjust learning rate function sqrt is not supported"),
    ("ns_steps", -1, "ns_steps must be a non-negative int, got -1"),
    ("ns_coefficients", "cubic", "ns_coefficients must be 'muon', 'polar_express'"),
]


@pytest.mark.parametrize(
    "key, value, message", LATER_CASES, ids=[f"{k}={v!r}" for k, v, _ in LATER_CASES]
)
def test_hyperparameter_made_invalid_later_raises_before_anything_changes(key, value, message):
    """Written into every group by hand (or by a scheduler): the step refuses it before any
    weight, state tensor, counter or estimate moves, even with a layer to skip pending."""
    model = mlp()
    opt = dropmuon.DropMuon(
        model, lr=0.05, sampling="full", fallback="adamw", nonfinite="skip",
        estimate_smoothness=True, smoothness_every=1,
    )  # fmt: skip
    train(model, opt, 3)
    assert all(v is not None for v in opt.smoothness)
    backward(model, opt, 3)
    model[0].weight.grad[0, 0] = NAN  # a layer nonfinite="skip" would count
    for group in opt.param_groups:
        group[key] = value
    before = everything(model, opt)
    with pytest.raises(ValueError, match=re.escape(message)):
        opt.step()
    assert_same(before, everything(model, opt))


# --------------------------------------------------------------------------------------------
# Checkpoints that do not fit: ValueError, and the optimizer as it was
# --------------------------------------------------------------------------------------------


def trained(seed=0, steps=3, **kwargs):
    model = mlp(seed=seed, **{k: kwargs.pop(k) for k in ("widths", "bias") if k in kwargs})
    opt = dropmuon.DropMuon(model, lr=0.05, seed=3, fallback="adamw", **kwargs)
    train(model, opt, steps)
    return model, opt


def checkpoint(**kwargs):
    return copy.deepcopy(trained(seed=1, steps=4, **kwargs)[1].state_dict())


def split_partition():
    """The same 3 layers, each as a weight group and a bias group."""
    model = mlp(seed=1)
    groups = [
        {"params": [p], "layer": i // 2}
        for i, p in enumerate(p for m in model[::2] for p in m.parameters())
    ]
    opt = dropmuon.DropMuon(groups, lr=0.05, seed=3, fallback="adamw")
    train(model, opt, 2)
    return opt.state_dict()


def edited(edit):
    state = checkpoint()
    edit(state)
    return state


def drop(container, key):
    del container[key]


def set_layers(state, positions):
    state["param_groups"][0]["dropmuon"]["param_layers"] = [positions]


def set_shape(state, index, name, shape):
    state["state"][index][name] = torch.zeros(shape)


LOAD_CASES = {
    "wider-model": (
        lambda: checkpoint(widths=(6, 9, 8, 3)),
        "parameter 0.weight has shape (8, 6) here and (9, 6) in the checkpoint: a different model",
    ),
    "more-layers": (
        lambda: checkpoint(widths=(6, 8, 8, 8, 3)),
        "checkpoint has 4 layers, this optimizer 3: a different model or partition",
    ),
    "no-bias-model": (
        lambda: checkpoint(bias=False),
        "param group 0 has 3 parameters in the checkpoint and 6 here",
    ),
    "other-partition": (
        split_partition,
        "checkpoint has 6 param groups, this optimizer 1: a different model or partition",
    ),
    "other-sampler": (
        lambda: checkpoint(sampling="full"),
        "checkpoint sampler has kind='full', this optimizer 'uniform'",
    ),
    "other-norms": (
        lambda: checkpoint(norms={"head": "row"}),
        "parameter 4.weight has norm 'row' in the checkpoint and 'spectral' here",
    ),
    "swapped-layers": (
        lambda: edited(lambda s: set_layers(s, [1, 1, 0, 0, 2, 2])),
        "parameter 0.weight is in layer 1 in the checkpoint and 0 here: a different partition",
    ),
    "repeated-layer": (
        lambda: edited(lambda s: set_layers(s, [0, 0, 0, 0, 2, 2])),
        "parameter 2.weight is in layer 0 in the checkpoint and 1 here: a different partition",
    ),
    "split-layer": (
        lambda: edited(lambda s: set_layers(s, [0, 1, 1, 1, 2, 2])),
        "parameter 0.bias is in layer 1 in the checkpoint, the rest of its layer in 0",
    ),
    "bad-sampler-seed": (
        lambda: edited(lambda s: s["param_groups"][0]["dropmuon"]["sampler"].update(seed=-1)),
        "seed must be an int in [0, 2**63)",
    ),
    "no-sampler": (
        lambda: edited(lambda s: drop(s["param_groups"][0]["dropmuon"], "sampler")),
        "incomplete DropMuon checkpoint: missing ['sampler']",
    ),
    "no-step": (
        lambda: edited(lambda s: drop(s["param_groups"][0]["dropmuon"], "step")),
        "incomplete DropMuon checkpoint: missing ['step']",
    ),
    "no-state": (
        lambda: edited(lambda s: drop(s, "state")),
        "incomplete DropMuon checkpoint: missing ['state/param_groups']",
    ),
    "no-param-groups": (  # the section lives in the first param group
        lambda: edited(lambda s: drop(s, "param_groups")),
        "not a DropMuon checkpoint: it has no 'dropmuon' section",
    ),
    "short-update-counts": (
        lambda: edited(lambda s: s["param_groups"][0]["dropmuon"]["update_counts"].pop()),
        "checkpoint's update_counts has 2 entries, not one per layer",
    ),
    "extra-param-group": (
        lambda: edited(lambda s: s["param_groups"].append(dict(s["param_groups"][0], params=[]))),
        "checkpoint has 2 param groups, this optimizer 1",
    ),
    "short-group": (
        lambda: edited(lambda s: s["param_groups"][0]["params"].pop()),
        "param group 0 has 5 parameters in the checkpoint and 6 here",
    ),
    "momentum-shape": (
        lambda: edited(lambda s: set_shape(s, 4, "momentum_buffer", (4, 4))),
        "the checkpoint's momentum_buffer of 4.weight has shape (4, 4), the parameter (3, 8)",
    ),
    "exp-avg-shape": (
        lambda: edited(lambda s: set_shape(s, 5, "exp_avg", (2,))),
        "the checkpoint's exp_avg of 4.bias has shape (2,), the parameter (3,)",
    ),
    "no-exp-avg-sq": (
        lambda: edited(lambda s: drop(s["state"][5], "exp_avg_sq")),
        "the checkpoint's AdamW state of 4.bias is incomplete",
    ),
    "missing-state": (
        lambda: edited(lambda s: s["state"].pop(4)),
        "the checkpoint has no state for 4.weight: an incomplete checkpoint",
    ),
    "version": (
        lambda: edited(lambda s: s["param_groups"][0]["dropmuon"].update(version=99)),
        "unsupported DropMuon checkpoint version 99",
    ),
    "torch-sgd": (
        lambda: torch.optim.SGD(mlp().parameters(), lr=0.1).state_dict(),
        "not a DropMuon checkpoint: it has no 'dropmuon' section",
    ),
    "torch-muon": (
        lambda: torch.optim.Muon([p for p in mlp().parameters() if p.dim() == 2]).state_dict(),
        "not a DropMuon checkpoint: it has no 'dropmuon' section",
    ),
    "model-state-dict": (
        lambda: mlp().state_dict(),
        "not a DropMuon checkpoint: it has no 'dropmuon' section",
    ),
    "not-a-dict": (lambda: [1, 2, 3], "not a DropMuon checkpoint: it has no 'dropmuon' section"),
}


def test_a_checkpoint_with_a_repeated_layer_is_refused_before_the_first_forward():
    """Before the first forward the checkpoint's order would be adopted: it must be one."""
    state = edited(lambda s: set_layers(s, [0, 0, 0, 0, 2, 2]))
    opt = dropmuon.DropMuon(mlp(seed=0), lr=0.05, seed=3, fallback="adamw")
    with pytest.raises(ValueError, match="layer positions are not 0..num_layers-1"):
        opt.load_state_dict(state)
    assert opt.layer_order.startswith("registration")


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_unfit_checkpoint_is_refused_and_changes_nothing(case):
    make, message = LOAD_CASES[case]
    state = make()
    model, opt = trained()
    sampler = opt.sampler.state_dict()
    before = everything(model, opt)
    with pytest.raises(ValueError, match=re.escape(message)):
        opt.load_state_dict(state)
    assert_same(before, everything(model, opt))
    assert opt.sampler.state_dict() == sampler

    # Still the optimizer it was: it trains on exactly like an untouched one.
    reference, ref_opt = trained()
    train(model, opt, 2, start=3)
    train(reference, ref_opt, 2, start=3)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_recorded_under_two_ranks_resumes_in_one_process():
    """world_size is information only: a checkpoint saved by rank 0 of 2 (here: its recorded
    world_size set to 2) continues in one process exactly like the uninterrupted run."""
    k = 4
    model = mlp()
    opt = dropmuon.DropMuon(model, lr=0.05, seed=3, fallback="adamw")
    first = train(model, opt, k)
    state = opt.state_dict()
    assert state["param_groups"][0]["dropmuon"]["world_size"] == 1
    state["param_groups"][0]["dropmuon"]["world_size"] = 2
    buffer = io.BytesIO()
    torch.save([model.state_dict(), state], buffer)
    straight = train(model, opt, k, start=k)
    expected = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    model_state, opt_state = torch.load(buffer, weights_only=True)
    assert opt_state["param_groups"][0]["dropmuon"]["world_size"] == 2
    resumed_model = mlp(seed=9)  # a different initialisation: all must come from the file
    resumed = dropmuon.DropMuon(resumed_model, lr=0.05, seed=3, fallback="adamw")
    resumed_model.load_state_dict(model_state)
    resumed.load_state_dict(opt_state)
    assert resumed.step_count == k
    assert train(resumed_model, resumed, k, start=k) == straight
    assert len(set(first + straight)) > 1
    for a, b in zip(resumed_model.parameters(), expected):
        assert torch.equal(a, b)
