"""Backprop truncation is real: with cutoff s, the backward pass does the work of the active
layers only, as counted by torch.utils.flop_counter.FlopCounterMode, and that count is what the
cost model predicts."""

import pytest
import torch
from dropin import FixedCutoff
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dropmuon
from dropmuon.compare.models import PaperCNN, ResNet18


def layer_forward_flops(module: nn.Module, inputs, outputs) -> int:
    """Forward FLOPs of a conv or linear layer (2 per multiply-add); 0 for others."""
    if isinstance(module, nn.Conv2d):
        n, c_out, h, w = outputs.shape
        kh, kw = module.kernel_size
        return 2 * n * c_out * h * w * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return 2 * (inputs.numel() // module.in_features) * module.in_features * module.out_features
    return 0


def measure(model, x, cutoff):
    """(measured backward FLOPs, predicted backward FLOPs, grads of frozen params are None)."""
    opt = dropmuon.DropMuon(model, sampling=FixedCutoff(cutoff))
    opt.zero_grad()
    records = {}

    def hook(module, args, output):
        records[module] = (layer_forward_flops(module, args[0], output), args[0].requires_grad)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    loss = model(x).square().mean()
    for h in handles:
        h.remove()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    measured = counter.get_total_flops()

    # Cost model: an active layer computes its weight gradient (= its forward FLOPs); a layer
    # whose input depends on an active layer also computes its input gradient (the same
    # FLOPs). In a sequential net the latter are the layers above the cutoff; with residual
    # branches, autograd's requires_grad on each input says which.
    active_modules = {
        id(model.get_submodule(name))
        for name, active in zip(opt.layer_names(), opt.active_layers)
        if active
    }
    predicted = 0
    for module, (flops, input_needs_grad) in records.items():
        predicted += flops * ((id(module) in active_modules) + input_needs_grad)
    frozen_clean = all(p.grad is None for p in model.parameters() if not opt.is_active(p))
    return measured, predicted, frozen_clean


@pytest.mark.parametrize(
    "name, make, x",
    [
        ("paper-cnn", lambda: PaperCNN(1, 10, 28), torch.randn(4, 1, 28, 28)),
        ("resnet18", lambda: ResNet18(1, 10, width=8), torch.randn(2, 1, 16, 16)),
    ],
)
def test_backward_flops_follow_the_cost_model(name, make, x):
    torch.manual_seed(0)
    model = make()
    num_layers = dropmuon.DropMuon(model).num_layers
    cutoffs = (
        range(num_layers)
        if num_layers < 8
        else [0, 1, 5, 12, num_layers // 2, num_layers - 2, num_layers - 1]
    )
    full = None
    for cutoff in cutoffs:
        measured, predicted, frozen_clean = measure(model, x, cutoff)
        assert frozen_clean, f"{name}: frozen parameters got gradients at cutoff {cutoff}"
        assert measured == pytest.approx(predicted, rel=0.05), (name, cutoff)
        if cutoff == 0:
            full = measured
        else:
            assert measured < full, (name, cutoff)
    # The deepest cutoff leaves only the head's weight gradient.
    assert measured == pytest.approx(
        2 * model.head.in_features * model.head.out_features * x.shape[0], rel=0.05
    )
