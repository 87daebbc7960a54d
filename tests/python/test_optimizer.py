"""DropMuon as a torch.optim optimizer: parity with torch.optim.Muon, every option and sampling
distribution, freezing, accumulation, tied weights, schedulers, param groups."""

import math

import pytest
import torch
import torch.optim._muon as torch_muon
from dropin import FixedCutoff
from torch import nn
from training import train_steps

import dropmuon
from dropmuon import ops, reference, update_rules


def mlp(bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, 32, bias=bias),
        nn.Tanh(),
        nn.Linear(32, 16, bias=bias),
        nn.Tanh(),
        nn.Linear(16, 5, bias=bias),
    )


def batch(step, n=64):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 20, generator=g), torch.randint(0, 5, (n,), generator=g)


def train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        x, y = batch(s)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def relative_deviation(a, b, start):
    """max |a - b| relative to how far a moved from the start, worst parameter."""
    return max(((x - y).abs().max() / (x - s).abs().max()).item() for x, y, s in zip(a, b, start))


MUON_KW = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)

# --------------------------------------------------------------------------------------------
# Parity with torch.optim.Muon
# --------------------------------------------------------------------------------------------


def test_newton_schulz_is_bitwise_torch_in_bfloat16():
    for shape in [(32, 20), (16, 32), (5, 16), (64, 64)]:
        g = torch.randn(shape)
        theirs = torch_muon._zeropower_via_newtonschulz(g, ops.MUON_COEFFICIENTS, 5, 1e-7)
        ours, _ = dropmuon.sharp(g, ns_precision="bfloat16")
        assert torch.equal(theirs.float(), ours), shape


def test_parity_with_torch_muon_in_float32(monkeypatch):
    """Same arithmetic on both sides (torch's NS switched to float32): only rounding-order
    differences remain, so 30 steps stay within 1e-4 of the distance travelled."""

    def float32_newton_schulz(grad, coefficients, steps, eps):
        a, b, c = coefficients
        x = grad.float().T if grad.size(0) > grad.size(1) else grad.float()
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.T if grad.size(0) > grad.size(1) else x

    start = [p.detach().clone() for p in mlp().parameters()]
    model = mlp()
    ours = train(model, dropmuon.Muon(model, ns_precision="native", **MUON_KW), 30)
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", float32_newton_schulz)
    model = mlp()
    theirs = train(model, torch.optim.Muon(model.parameters(), **MUON_KW), 30)
    assert relative_deviation(theirs, ours, start) < 1e-4


def test_parity_with_torch_muon_in_bfloat16():
    """Both round the NS iterates to bfloat16 (bitwise the same NS, above), but elementwise
    float32 ops differ by FMA contraction, and one ulp flips bfloat16 roundings downstream: the
    runs then drift like torch against itself from a 1-ulp perturbation. We allow 5x that."""
    start = [p.detach().clone() for p in mlp().parameters()]
    model = mlp()
    theirs = train(model, torch.optim.Muon(model.parameters(), **MUON_KW), 30)
    model = mlp()
    ours = train(model, dropmuon.Muon(model, **MUON_KW), 30)
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 2**-23)
    perturbed = train(model, torch.optim.Muon(model.parameters(), **MUON_KW), 30)
    spread = relative_deviation(theirs, perturbed, start)
    deviation = relative_deviation(theirs, ours, start)
    assert deviation < max(5 * spread, 1e-3), (deviation, spread)
    assert deviation < 0.1


# --------------------------------------------------------------------------------------------
# Options: each compared with a hand-written step, so an ignored option fails
# --------------------------------------------------------------------------------------------


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


def net_batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


def manual_training(
    model,
    steps,
    *,
    lr=1e-3,
    weight_decay=0.1,
    momentum=0.95,
    nesterov=True,
    schedule=None,
    adjust="original",
    radius="fixed",
    L0=1.0,
    L1=0.0,
    eps=1e-7,
    norms=None,
    adamw=None,
    lr_at=None,
):
    """Full-sampling DropMuon written out by hand (float32 NS) on small_net; vectors on AdamW
    at the lr by default, as DropMuon's defaults."""
    schedule = schedule or ops.ns_schedule("muon", 5)
    params = list(model.parameters())
    norms = norms or ["spectral", "adamw"] * 3
    adamw = adamw or (lr, (0.9, 0.999), 1e-8)
    bufs = [torch.zeros_like(p) for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for s in range(steps):
        x, y = net_batch(s)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        step_lr = lr_at(s) if lr_at else lr
        with torch.no_grad():
            for i, p in enumerate(params):
                g = p.grad
                if norms[i] == "adamw":
                    a_lr, (b1, b2), a_eps = adamw
                    a_lr = a_lr * step_lr / lr
                    m1, m2 = moments[i]
                    p.mul_(1 - a_lr * weight_decay)
                    m1.lerp_(g, 1 - b1)
                    m2.mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (m2.sqrt() / math.sqrt(1 - b2 ** (s + 1))).add_(a_eps)
                    p.addcdiv_(m1, denom, value=-a_lr / (1 - b1 ** (s + 1)))
                    continue
                bufs[i].lerp_(g, 1 - momentum)
                d = g.lerp(bufs[i], momentum) if nesterov else bufs[i].clone()
                matrix = update_rules.as_matrix(d).unsqueeze(0)
                o, dual = reference.sharp(
                    matrix,
                    norms[i],
                    list(schedule.coefficients),
                    schedule.norm_scale,
                    schedule.norm_offset,
                    eps,
                )
                rows, cols = matrix.shape[1:]
                if radius == "adaptive":
                    step = step_lr * dual.item() / (L0 + L1 * dual.item())
                else:
                    ratio = update_rules.lr_ratio(
                        adjust if norms[i] == "spectral" else "none", rows, cols
                    )
                    step = step_lr * ratio
                p.mul_(1 - step_lr * weight_decay)
                p.add_(o[0].reshape(p.shape), alpha=-step)
    return [p.detach().clone() for p in params]


def optimizer_training(model, steps, scheduler=None, **options):
    opt = dropmuon.DropMuon(model, sampling="full", ns_precision="native", **options)
    train_steps(model, opt, net_batch, steps, scheduler=scheduler(opt) if scheduler else None)
    return [p.detach().clone() for p in model.parameters()]


OPTION_CASES = {
    "defaults": (dict(), dict()),
    "lr": (dict(lr=0.05), dict(lr=0.05)),
    "lr-tensor": (dict(lr=torch.tensor(0.05)), dict(lr=0.05)),
    "momentum": (dict(momentum=0.5), dict(momentum=0.5)),
    "nesterov-off": (dict(nesterov=False), dict(nesterov=False)),
    "weight-decay": (dict(lr=0.05, weight_decay=0.5), dict(lr=0.05, weight_decay=0.5)),
    "ns-steps": (dict(ns_steps=2), dict(schedule=ops.ns_schedule("muon", 2))),
    "ns-triple": (
        dict(ns_coefficients=(2.0, -1.5, 0.5), ns_steps=3),
        dict(schedule=ops.ns_schedule((2.0, -1.5, 0.5), 3)),
    ),
    "ns-schedule": (
        dict(ns_coefficients=[(3.0, -3.2, 1.2), (1.5, -0.5, 0.0)], ns_steps=None),
        dict(schedule=ops.ns_schedule([(3.0, -3.2, 1.2), (1.5, -0.5, 0.0)], None)),
    ),
    "polar-express": (
        dict(ns_coefficients="polar_express"),
        dict(schedule=ops.ns_schedule("polar_express", 5)),
    ),
    "adjust-rms": (dict(adjust_lr_fn="match_rms_adamw"), dict(adjust="match_rms_adamw")),
    "adaptive-radius": (
        dict(lr=0.5, radius="adaptive", L0=2.0, L1=0.5),
        dict(lr=0.5, radius="adaptive", L0=2.0, L1=0.5),
    ),
    "eps": (dict(eps=1e3), dict(eps=1e3)),
    "fallback-adamw": (
        dict(lr=0.02, fallback="adamw", adamw_lr=0.003, adamw_betas=(0.8, 0.99), adamw_eps=1e-3),
        dict(lr=0.02, norms=["spectral", "adamw"] * 3, adamw=(0.003, (0.8, 0.99), 1e-3)),
    ),
    "norms-by-role": (
        dict(norms={"head": "row", "matrix": "frobenius", "vector": "adamw"}),
        dict(
            norms=["frobenius", "adamw", "frobenius", "adamw", "row", "adamw"],
            adamw=(1e-3, (0.9, 0.999), 1e-8),
        ),
    ),
    "column-norm": (
        dict(norms={"head": "column"}),
        dict(norms=["spectral", "adamw", "spectral", "adamw", "column", "adamw"]),
    ),
    "fallback-sign": (dict(fallback="sign"), dict(norms=["spectral", "sign"] * 3)),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_option_matches_hand_written_step(case):
    options, manual = OPTION_CASES[case]
    ours = optimizer_training(small_net(), 3, **options)
    expected = manual_training(small_net(), 3, **manual)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_lr_scheduler_scales_both_updates():
    options = dict(lr=0.02, fallback="adamw", adamw_lr=0.004)
    ours = optimizer_training(
        small_net(),
        4,
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5),
        **options,
    )
    expected = manual_training(
        small_net(),
        4,
        lr=0.02,
        norms=["spectral", "adamw"] * 3,
        adamw=(0.004, (0.9, 0.999), 1e-8),
        lr_at=lambda s: 0.02 * 0.5**s,
    )
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_bfloat16_iterates_are_the_default_and_close_to_native():
    default = optimizer_training(small_net(), 3, lr=0.02)
    opt = dropmuon.DropMuon(small_net(), sampling="full")
    assert all(g["ns_precision"] == "bfloat16" for g in opt.param_groups)
    native = manual_training(small_net(), 3, lr=0.02)
    start = [p.detach() for p in small_net().parameters()]
    assert relative_deviation(native, default, start) < 0.05
    assert any(not torch.equal(a, b) for a, b in zip(native, default))


# --------------------------------------------------------------------------------------------
# Sampling: the optimizer's layers are the sampler's draws
# --------------------------------------------------------------------------------------------


def run_masks(opt, model, steps):
    """Trains, checking that exactly the active layers' parameters get gradients."""
    masks = []
    for s in range(steps):
        masks.append(opt.active_layers)
        x, y = net_batch(s)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            assert (p.grad is not None) == opt.active_layers[opt.layer_of(p)]
            assert p.requires_grad  # the freeze lasted the forward pass only
        opt.step()
    return masks


SAMPLING_CASES = {
    "uniform": dict(sampling="uniform"),
    "custom": dict(sampling=[0.2, 0.0, 0.8]),
    "tau_nice": dict(sampling="tau_nice", tau=2),
    "epoch_shift": dict(sampling="epoch_shift", total_steps=10),
    "cost_optimal": dict(sampling="cost_optimal"),
    "full": dict(sampling="full"),
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_layers_follow_the_sampler(case):
    model = small_net()
    opt = dropmuon.DropMuon(model, lr=0.01, seed=7, **SAMPLING_CASES[case])
    masks = run_masks(opt, model, 12)
    sampler = opt.sampler
    if case == "cost_optimal":
        assert all(v is not None and v > 0 for v in opt.smoothness), opt.smoothness
        assert masks[0] == [True] * 3  # no estimates yet: full updates
        assert opt.active_layers == sampler.sample(12, opt.smoothness)
        return
    for s, mask in enumerate(masks):
        assert mask == sampler.sample(s), (s, mask)
    if case == "tau_nice":
        assert all(sum(m) == 2 for m in masks)
    if case == "full":
        assert all(all(m) for m in masks)
    if case == "custom":
        assert all(m[0] == m[1] and m[2] for m in masks) and not all(m[0] for m in masks)
    if case == "epoch_shift":
        expected = [
            ops.sample_layers(3, 7, s, "epoch_shift", progress=min(1, s / 10)).tolist()
            for s in range(12)
        ]
        assert masks == expected


def test_epoch_shift_set_progress_changes_draws():
    opt = dropmuon.DropMuon(small_net(), sampling="epoch_shift", seed=3)
    early = [opt.sampler.sample(s) for s in range(300)]
    opt.set_progress(1.0)
    late = [opt.sampler.sample(s) for s in range(300)]
    assert sum(m[0] for m in early) > 200 and sum(m[0] for m in late) < 50
    with pytest.raises(ValueError, match="progress"):
        opt.set_progress(1.5)


def test_seeds_give_different_layer_sequences():
    a = dropmuon.DropMuon(small_net(), seed=1)
    b = dropmuon.DropMuon(small_net(), seed=2)
    seq = lambda o: [o.sampler.sample(s) for s in range(50)]  # noqa: E731
    assert seq(a) != seq(b)
    assert seq(a) == seq(dropmuon.DropMuon(small_net(), seed=1))


def test_user_sampler_object_and_its_errors():
    model = small_net()
    opt = dropmuon.DropMuon(model, sampling=FixedCutoff(2))
    assert run_masks(opt, model, 3) == [[False, False, True]] * 3

    class Bad:
        def sample(self, step, num_layers):
            return [False] * num_layers

    with pytest.raises(ValueError, match="at least one True"):
        dropmuon.DropMuon(small_net(), sampling=Bad())


# --------------------------------------------------------------------------------------------
# Freezing, truncation bookkeeping, accumulation, tied weights
# --------------------------------------------------------------------------------------------


class FullThenHead:
    """A user sampler: every layer at step 0, only the head afterwards."""

    def sample(self, step, num_layers):
        return [step == 0 or i == num_layers - 1 for i in range(num_layers)]


def test_frozen_layers_keep_weights_and_momentum():
    model = small_net()
    opt = dropmuon.DropMuon(model, lr=0.05, weight_decay=0.5, sampling=FullThenHead())
    run_masks(opt, model, 1)
    frozen = list(model[0].parameters()) + list(model[3].parameters())
    before = [p.detach().clone() for p in frozen]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in frozen]
    x, y = net_batch(5)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in frozen)
    opt.step()
    for p, b, state in zip(frozen, before, states):
        assert torch.equal(p, b)  # no update, no weight decay
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())  # nor state
    assert opt.update_counts == [1, 1, 2]


def test_gradient_accumulation_sums_micro_batches():
    def run(micro):
        model = small_net()
        opt = dropmuon.DropMuon(model, lr=0.05, seed=4, ns_precision="native")
        for s in range(4):
            x, y = net_batch(s)
            opt.zero_grad()
            for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
                (nn.functional.cross_entropy(model(xs), ys, reduction="sum") / 8).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(1), run(4)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class TiedLM(nn.Module):
    """Head registered before the embedding, and tied to it."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 11, bias=False)
        self.embed = nn.Embedding(11, 8)
        self.mix = nn.Linear(8, 8)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_tied_weights_and_execution_order():
    model = TiedLM()
    opt = dropmuon.DropMuon(model, lr=0.01, sampling=FixedCutoff(1))
    # Registration order: head (owns the tied weight), mix. The first forward reads the tied
    # weight first in the embedding (F.embedding), then mix's, then the tied one again: its
    # layer (named head, its first registrant) sits on the input side, where it is first read.
    assert opt.num_layers == 2
    tokens = torch.randint(0, 11, (4, 3))
    loss = model(tokens).sum()
    loss.backward()
    opt.step()
    assert opt.layer_names() == ["head", "mix"]
    assert "head.weight" in dropmuon.describe(opt)
    # Cutoff 1: the tied weight's layer is frozen (no backward into the embedding), mix active.
    assert model.head.weight.grad is None and model.mix.weight.grad is not None


def test_execution_order_freezes_the_first_run_layer():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.last = nn.Linear(6, 2)
            self.first = nn.Linear(4, 6)

        def forward(self, x):
            return self.last(torch.relu(self.first(x)))

    model = Reversed()
    opt = dropmuon.DropMuon(model, sampling=FixedCutoff(1))
    model(torch.randn(3, 4)).sum().backward()
    assert model.first.weight.grad is None and model.last.weight.grad is not None
    opt.step()
    assert opt.layer_names() == ["first", "last"]  # 'last' was registered first
    assert opt.layer_of(model.last.weight) == 1


def test_unfreeze_gives_full_backwards_until_the_next_step():
    model = small_net()
    opt = dropmuon.DropMuon(model, sampling=FixedCutoff(2))
    model(net_batch(0)[0]).sum().backward()
    opt.step()
    assert all(p.requires_grad for p in model.parameters())  # the user's flags between steps
    opt.unfreeze()
    opt.zero_grad()
    model(net_batch(1)[0]).sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # nothing frozen
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # still updates only the active layer, and arms the freeze again
    after = list(model.parameters())
    assert [not torch.equal(a, b) for a, b in zip(before, after)] == [False] * 4 + [True] * 2
    opt.zero_grad()
    model(net_batch(2)[0]).sum().backward()
    assert [p.grad is not None for p in model.parameters()] == [False] * 4 + [True] * 2


# --------------------------------------------------------------------------------------------
# Param groups, bad input, Muon, describe
# --------------------------------------------------------------------------------------------


def test_explicit_param_groups_with_layers():
    model = small_net()
    groups = [
        {"params": [model[5].weight, model[5].bias], "layer": 9, "lr": 0.1},
        {"params": [model[0].weight, model[0].bias], "layer": 0},
        {"params": [model[3].weight], "layer": 4, "norm": "frobenius"},
        {"params": [model[3].bias], "layer": 4},
    ]
    opt = dropmuon.DropMuon(groups, lr=0.01, sampling="full")
    assert opt.num_layers == 3
    assert [g["layer"] for g in opt.param_groups] == [9, 0, 4, 4]  # the groups as passed
    assert [opt.layer_of(g["params"][0]) for g in opt.param_groups] == [2, 0, 1, 1]
    assert opt.layer_names() == ["layer 0", "layer 4", "layer 9"]
    assert opt.norm_of(model[3].weight) == "frobenius"
    assert [opt.norm_of(p) for p in (model[5].weight, model[5].bias)] == ["spectral", "adamw"]
    assert opt.param_groups[0]["lr"] == 0.1


def test_a_parameter_list_gets_the_modules_that_run_it_as_layers():
    """No "layer" keys: the layers are the modules owning the parameters in the model the first
    forward runs, placed by use, as if the model had been passed; until then, one."""
    model = small_net()
    opt = dropmuon.DropMuon(model.parameters(), sampling=FixedCutoff(1))
    assert opt.num_layers == 1 and opt.layer_order.startswith("pending")
    x, y = net_batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    # Found as the forward began, so step 0 already froze layer 0 (cutoff 1).
    assert model[0].weight.grad is None and model[3].weight.grad is not None
    opt.step()
    assert opt.layer_names() == ["0", "3", "5"] and opt.layer_order == "first forward"


def test_raw_tensors_stepped_without_a_module_forward_are_one_layer_each():
    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2))]
    opt = dropmuon.DropMuon(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.num_layers == 2 and opt.layer_order == "param groups"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "Learning rate should be >= 0 but is: -1.0"),
        (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
        (dict(momentum=-0.1), "momentum should be >= 0 but is: -0.1"),
        (dict(momentum=1.5), "momentum should be <= 1"),
        (dict(weight_decay=-1.0), "weight decay should be >= 0 but is: -1.0"),
        (dict(adjust_lr_fn="sqrt"), "Adjust learning rate function sqrt is not supported"),
        (dict(eps=-1.0), "Invalid epsilon value"),
        (dict(ns_steps=-1), "ns_steps"),
        (dict(ns_coefficients="cubic"), "ns_coefficients"),
        (dict(ns_precision="fp8"), "ns_precision"),
        (dict(radius="auto"), "radius"),
        (dict(radius="adaptive", L0=0.0, L1=0.0), "L0 and L1"),
        (dict(sampling="random"), "sampling must be one of"),
        (dict(sampling=[0.5, 0.6, -0.1]), "probabilities must be finite and >= 0"),
        (dict(sampling=[0.5, 0.4, 0.0]), "sum to 1"),
        (dict(sampling=[0.5, 0.5]), "one probability per layer"),
        (dict(sampling="tau_nice"), "tau_nice needs an int tau"),
        (dict(sampling="tau_nice", tau=4), r"tau in \[1, 3\]"),
        (dict(tau=2), "tau only applies"),
        (dict(seed=-1), "seed"),
        (dict(total_steps=0), "total_steps"),
        (dict(fallback="sgd"), "fallback"),
        (dict(norms={"hidden": "spectral"}), "unknown role"),
        (dict(norms={"head": "nuclear"}), "unknown norm"),
        (dict(adamw_betas=(1.0, 0.9)), "Invalid beta parameter at index 0"),
        (dict(adamw_eps=-1.0), "Invalid epsilon value"),
        (dict(nonfinite="ignore"), "nonfinite"),
        (dict(sampling="cost_optimal", estimate_smoothness=False), "needs estimate_smoothness"),
        (dict(smoothness_beta=1.0), "smoothness_beta"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dropmuon.DropMuon(small_net(), **kwargs)


def test_group_errors():
    model = small_net()
    with pytest.raises(ValueError, match="every param group has a 'layer'"):
        dropmuon.DropMuon(
            [{"params": [model[0].weight], "layer": 0}, {"params": [model[3].weight]}]
        )
    with pytest.raises(ValueError, match="empty parameter list"):
        dropmuon.DropMuon([])
    opt = dropmuon.DropMuon(model)
    with pytest.raises(ValueError, match="not the model's"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert len(opt.param_groups) == 1  # refused: nothing changed


def test_muon_is_full_sampling():
    model = small_net()
    opt = dropmuon.Muon(model, lr=0.01)
    assert run_masks(opt, model, 3) == [[True] * 3] * 3
    with pytest.raises(TypeError, match="every layer"):
        dropmuon.Muon(small_net(), sampling="uniform")


def test_describe_lists_layers_and_norms():
    opt = dropmuon.DropMuon(small_net(), fallback="adamw")
    text = dropmuon.describe(opt)
    assert "3 layers" in text
    assert "0.weight (4, 2, 3, 3) spectral as 4x18" in text
    assert "0.bias (4,) adamw" in text
    assert text.count("0.333") == 3


def test_huge_finite_gradients_are_not_taken_for_nonfinite():
    # Their float32 sum overflows to inf (the cheap screen); the exact check must clear them.
    model = small_net()
    opt = dropmuon.Muon(model, lr=0.01, ns_precision="native")
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 3e38)
    opt.step()
    for p, old in zip(model.parameters(), before):
        assert torch.isfinite(p).all()
        assert not torch.equal(p, old)
    assert opt.skipped_nonfinite == [0] * len(opt.skipped_nonfinite)


def test_module_paths_of_0_1_name_the_moved_modules():
    """The subpackages moved ops, reference and fsdp; their 0.1 paths still import them."""
    import importlib

    from dropmuon.distributed import fsdp
    from dropmuon.kernels import ops, reference

    for old, module in (("ops", ops), ("reference", reference), ("fsdp", fsdp)):
        assert importlib.import_module(f"dropmuon.{old}") is module
        assert getattr(dropmuon, old) is module
    from dropmuon.fsdp import release_device_meshes

    assert release_device_meshes is fsdp.release_device_meshes
