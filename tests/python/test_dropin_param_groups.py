"""Issue 22, finding 8: param_groups are what the user passed. A flat parameter list (or the
module) is one group, so code that reads or sets param_groups[0]["lr"] (LR schedulers, warm-up
loops) reaches every parameter; group dicts keep their order and keys."""

import pytest
import torch
from dropin import cnn, cnn_loss, step

import dropmuon


@pytest.mark.parametrize("given", ["module", "parameters", "named_parameters"])
def test_a_flat_list_or_a_module_is_one_group(given):
    model = cnn()
    params = {
        "module": model,
        "parameters": model.parameters(),
        "named_parameters": model.named_parameters(),
    }[given]
    opt = dropmuon.DropMuon(params, lr=0.02)
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["params"] == list(model.parameters())
    assert "layer" not in opt.param_groups[0]


def test_setting_the_first_groups_lr_reaches_every_layer():
    """A warm-up loop sets param_groups[0]["lr"]; with lr 0 nothing moves but the weight decay
    (itself lr-scaled, so nothing at all)."""
    model = cnn()
    opt = dropmuon.DropMuon(model.parameters(), lr=0.02, sampling="full")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert scheduler.get_last_lr() == [0.01] and opt.param_groups[0]["lr"] == 0.01
    opt.param_groups[0]["lr"] = 0.0
    start = [p.detach().clone() for p in model.parameters()]
    step(model, opt, cnn_loss, 0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), start))


def test_group_dicts_keep_their_order_and_keys():
    model = cnn()
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": 0.1, "tag": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "tag": "no_decay"},
    ]
    opt = dropmuon.DropMuon(groups, lr=0.02)
    assert [g["tag"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["params"] == decay
    for s in range(3):
        step(model, opt, cnn_loss, s)
