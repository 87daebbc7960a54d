"""Mixed precision: bfloat16 autocast, bfloat16 parameters (no aliasing of the momentum buffer,
the bug torch.optim.Muon has), and torch.amp.GradScaler's skipped steps."""

import pytest
import torch
from torch import nn

import dropmuon
from dropmuon.compare.models import PaperCNN


def batch(step, n=16):
    g = torch.Generator().manual_seed(300 + step)
    return torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


def cnn(dtype=torch.float32):
    torch.manual_seed(0)
    return PaperCNN(1, 10, 12, channels=(4, 8, 8)).to(dtype)


def loss_of(model, step, autocast=False):
    x, y = batch(step)
    x = x.to(next(model.parameters()).dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    return nn.functional.cross_entropy(out.float(), y), out.dtype


def test_bfloat16_autocast_training():
    """Layers in bfloat16 under autocast, parameters, gradients and state in float32: the loss
    goes down, tracking the float32 run's within bfloat16's precision."""
    losses = {}
    for autocast in (False, True):
        model = cnn()
        opt = dropmuon.DropMuon(model, lr=0.02, sampling="uniform", seed=2)
        losses[autocast] = []
        for s in range(16):
            opt.zero_grad()
            loss, out_dtype = loss_of(model, s % 4, autocast=autocast)
            assert out_dtype == (torch.bfloat16 if autocast else torch.float32)
            loss.backward()
            opt.step()
            losses[autocast].append(loss.item())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values())
        assert all(torch.isfinite(p).all() for p in model.parameters())
    mixed, full = losses[True], losses[False]
    assert sum(mixed[-4:]) < 0.95 * sum(mixed[:4])
    assert max(abs(a - b) for a, b in zip(mixed, full)) < 0.05


def lerp_bf16(buffer, grad, momentum):
    """torch's lerp in bfloat16 (computed in float32, rounded once): the EMA as stored."""
    return torch.lerp(buffer.float(), grad.float(), 1 - momentum).bfloat16()


@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
def test_bfloat16_parameters_momentum_buffer_is_its_own(nesterov):
    """The momentum buffer must hold exactly the EMA of the gradients after each step: an update
    that normalised or orthogonalised it in place (aliasing) would change it."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(24, 16, dtype=torch.bfloat16))
    opt = dropmuon.DropMuon([weight], lr=0.05, momentum=0.9, nesterov=nesterov, sampling="full")
    expected = torch.zeros_like(weight)
    for step in range(3):
        weight.grad = torch.randn_like(weight) * (step + 1)
        grad_before = weight.grad.clone()
        weight_before = weight.detach().clone()
        opt.step()
        buffer = opt.state[weight]["momentum_buffer"]
        expected = lerp_bf16(expected, grad_before, 0.9)
        assert buffer.dtype == torch.bfloat16
        assert torch.equal(buffer, expected), step
        assert torch.equal(weight.grad, grad_before)  # gradients are only read
        assert not torch.equal(weight, weight_before)
        storages = {t.untyped_storage().data_ptr() for t in (weight, weight.grad, buffer)}
        assert len(storages) == 3


def torch_muon_bf16_step():
    """One torch.optim.Muon step on a bfloat16 weight (nesterov off: the update *is* the
    buffer, and grad.bfloat16() of a bfloat16 tensor is itself): (its buffer, the true EMA)."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(24, 16, dtype=torch.bfloat16))
    opt = torch.optim.Muon([weight], lr=0.05, momentum=0.9, nesterov=False)
    weight.grad = torch.randn_like(weight) * 4
    ema = lerp_bf16(torch.zeros_like(weight), weight.grad, 0.9)
    opt.step()
    return opt.state[weight]["momentum_buffer"], ema


def torch_muon_aliases_its_buffer():
    """Whether torch.optim.Muon still normalises a bfloat16 momentum buffer in place."""
    buffer, ema = torch_muon_bf16_step()
    return not torch.equal(buffer, ema)


def test_the_aliasing_check_catches_torch_muon():
    """The check above fails on an optimizer with the aliasing bug (torch 2.13's Muon)."""
    if not torch_muon_aliases_its_buffer():
        pytest.skip("this torch's Muon no longer aliases its momentum buffer")
    # Its buffer was divided by its norm: far from the EMA, not a rounding difference.
    buffer, ema = torch_muon_bf16_step()
    torch.testing.assert_close(buffer.float().norm(), torch.tensor(1.0), atol=0.02, rtol=0)
    assert ema.float().norm() > 5


def test_bfloat16_and_float32_layers_in_one_model():
    model = cnn()
    model.head.to(torch.bfloat16)
    opt = dropmuon.DropMuon(model, lr=0.02, sampling="full")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0)
    features = model.features(x).flatten(1)
    loss = nn.functional.cross_entropy(model.head(features.bfloat16()).float(), y)
    loss.backward()
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert p.dtype == b.dtype and not torch.equal(p, b)
    assert opt.state[model.head.weight]["momentum_buffer"].dtype == torch.bfloat16


def snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state_dict()["state"].items()},
        opt.state_dict()["param_groups"][0]["dropmuon"],
        [p.requires_grad for p in model.parameters()],
    )


def assert_same(a, b):
    params_a, state_a, extra_a, requires_a = a
    params_b, state_b, extra_b, requires_b = b
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b))
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for name in state_a[key]:
            assert torch.equal(state_a[key][name], state_b[key][name])
    assert extra_a == extra_b and requires_a == requires_b


@pytest.mark.parametrize("fallback", ["sign", "adamw"])
def test_grad_scaler_skipped_step_moves_nothing(fallback):
    """GradScaler.step skips optimizer.step() when the unscaled gradients hold Inf/NaN. Then the
    step counter, the sampler's draw, the frozen layers, the weights and every state tensor must
    stay; the retried step updates the layers the skipped one would have."""
    model = cnn()
    opt = dropmuon.DropMuon(model, lr=0.02, sampling="uniform", seed=11, fallback=fallback)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for s in range(3):  # some state first
        opt.zero_grad()
        scaler.scale(loss_of(model, s, autocast=True)[0]).backward()
        scaler.step(opt)
        scaler.update()
    assert opt.step_count == 3
    before = snapshot(model, opt)
    layers, counts = opt.active_layers, list(opt.update_counts)

    opt.zero_grad()
    scaler.scale(loss_of(model, 3, autocast=True)[0]).backward()
    active = [p for p in model.parameters() if p.grad is not None]
    active[0].grad[0].fill_(float("inf"))  # an overflow in the scaled backward
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # backed off
    assert opt.step_count == 3 and opt.update_counts == counts and opt.active_layers == layers
    assert_same(before, snapshot(model, opt))

    opt.zero_grad()
    scaler.scale(loss_of(model, 3, autocast=True)[0]).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 4
    updated = [c1 - c0 for c0, c1 in zip(counts, opt.update_counts)]
    assert updated == [int(a) for a in layers]  # exactly the layers drawn for the skipped step


def test_grad_scaler_unscales_before_the_update():
    """With a GradScaler, DropMuon sees the true gradients: the same trajectory as without it
    (the scale is a power of two, so unscaling is exact)."""
    runs = []
    for use_scaler in (False, True):
        model = cnn()
        opt = dropmuon.DropMuon(model, lr=0.02, sampling="uniform", seed=4, fallback="adamw")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=use_scaler)
        for s in range(4):
            opt.zero_grad()
            scaler.scale(loss_of(model, s)[0]).backward()
            scaler.step(opt)
            scaler.update()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
