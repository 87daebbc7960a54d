"""Issue 22, finding 1: the model can be saved (torch.save of the whole module, as
word_language_model does every epoch) and deep-copied at any point of training, and what comes
back is the user's model: every flag as the user left it, and a new optimizer on it sees every
layer."""

import copy
import io

import pytest
import torch
from dropin import MODELS, assert_twins_agree, step

import dropmuon


def saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def check_copies(model, loss_fn, num_layers):
    for twin in (saved_and_loaded(model), copy.deepcopy(model)):
        assert [p.requires_grad for p in twin.parameters()] == [True] * len(list(twin.parameters()))
        for a, b in zip(twin.parameters(), model.parameters()):
            assert torch.equal(a, b)
        assert torch.equal(loss_fn(twin, 0), loss_fn(model, 0))
        assert dropmuon.DropMuon(twin).num_layers == num_layers  # a new optimizer sees them all


@pytest.mark.parametrize("cls", [dropmuon.DropMuon, dropmuon.Muon])
@pytest.mark.parametrize("name", list(MODELS))
def test_save_and_deepcopy_at_every_point_of_training(cls, name):
    make, loss_fn = MODELS[name]
    model = make()
    opt = cls(model, lr=0.02, fallback="adamw")
    num_layers = opt.num_layers
    check_copies(model, loss_fn, num_layers)  # right after construction
    for s in range(4):
        opt.zero_grad()
        loss = loss_fn(model, s)
        check_copies(model, loss_fn, num_layers)  # between the forward and the backward
        loss.backward()
        check_copies(model, loss_fn, num_layers)  # between the backward and the step
        opt.step()
        check_copies(model, loss_fn, num_layers)  # after the step, next cutoff drawn
    assert sum(opt.active_layers) < num_layers or cls is dropmuon.Muon  # a draw froze some


def test_a_model_saved_with_its_optimizer_resumes_together():
    """torch.save({"model": model, "opt": opt}) and back: one pickle, so the optimizer's
    parameters are the model's, and training continues on the same trajectory."""
    make, loss_fn = MODELS["cnn"]
    model = make()
    opt = dropmuon.DropMuon(model, lr=0.02, seed=2)
    for s in range(3):
        step(model, opt, loss_fn, s)
    buffer = io.BytesIO()
    torch.save({"model": model, "opt": opt}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    model2, opt2 = loaded["model"], loaded["opt"]
    assert_twins_agree((model, opt), (model2, opt2), loss_fn, range(3, 8))
