"""Issue 22, finding 5: named parameters keep their names, as in torch.optim: in param_groups,
in state_dict(), and across loads between named and unnamed optimizers (both ways)."""

import copy

import pytest
import torch
from dropin import cnn, cnn_loss, step

import dropmuon

CLASSES = [dropmuon.DropMuon, dropmuon.Muon]


@pytest.mark.parametrize("cls", CLASSES)
def test_named_parameters_are_kept(cls):
    model = cnn()
    opt = cls(model.named_parameters(), lr=0.02)
    names = [n for n, _ in model.named_parameters()]
    assert opt.param_groups[0]["param_names"] == names
    assert opt.state_dict()["param_groups"][0]["param_names"] == names
    assert opt.param_name(model[0].weight) == "0.weight"
    # An optimizer built on the module carries the same names.
    assert cls(model).param_groups[0]["param_names"] == names


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("named_from, named_to", [(True, False), (False, True), (True, True)])
def test_state_dicts_load_between_named_and_unnamed(cls, named_from, named_to):
    def build(model, named):
        return cls(model.named_parameters() if named else model.parameters(), lr=0.02, seed=1)

    model = cnn()
    opt = build(model, named_from)
    for s in range(3):
        step(model, opt, cnn_loss, s)
    twin = copy.deepcopy(model)
    twin_opt = build(twin, named_to)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    if named_from or named_to:  # torch: loaded names replace, missing ones leave them
        names = [n for n, _ in model.named_parameters()]
        assert twin_opt.state_dict()["param_groups"][0]["param_names"] == names
    for s in range(3, 6):
        step(model, opt, cnn_loss, s)
        step(twin, twin_opt, cnn_loss, s)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
