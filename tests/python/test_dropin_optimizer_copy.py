"""Issue 22, finding 6: copy.deepcopy and pickling of the optimizer keep everything it needs
(sampler, step counter, statistics, layers): the copy continues the same trajectory."""

import copy
import pickle

import pytest
import torch
from dropin import MODELS, assert_twins_agree, step

import dropmuon

CLASSES = [dropmuon.DropMuon, dropmuon.Muon]


def public(opt):
    return {k for k in opt.__dict__ if not k.startswith("_")}


@pytest.mark.parametrize("cls", CLASSES)
def test_deepcopy_keeps_every_public_attribute(cls):
    model, loss_fn = MODELS["cnn"]
    model = model()
    opt = cls(model, lr=0.02, seed=3)
    for s in range(3):
        step(model, opt, loss_fn, s)
    twin = copy.deepcopy(opt)
    assert public(twin) == public(opt)
    assert twin.update_counts == opt.update_counts
    assert twin.skipped_nonfinite == opt.skipped_nonfinite
    assert twin.sampler.state_dict() == opt.sampler.state_dict()
    assert twin.step_count == opt.step_count and twin.active_layers == opt.active_layers


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_copied_model_and_optimizer_continue_the_same_trajectory(how, name):
    make, loss_fn = MODELS[name]
    model = make()
    opt = dropmuon.DropMuon(model, lr=0.02, seed=5, fallback="adamw")
    for s in range(3):
        step(model, opt, loss_fn, s)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.layer_names() == opt.layer_names()
    assert_twins_agree((model, opt), (model2, opt2), loss_fn, range(3, 9))
    assert opt2.update_counts == opt.update_counts


def test_a_deepcopied_optimizer_alone_steps_its_own_copies_like_the_original():
    """torch.optim's semantics: deepcopy(opt) copies the parameters too; given the same
    gradients, the copy makes the same step on them."""
    make, loss_fn = MODELS["cnn"]
    model = make()
    opt = dropmuon.DropMuon(model, lr=0.02, seed=5)
    step(model, opt, loss_fn, 0)
    twin = copy.deepcopy(opt)
    loss_fn(model, 1).backward()
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for p, q in zip(model.parameters(), twin_params):
        q.grad = None if p.grad is None else p.grad.clone()
    opt.step()
    twin.step()
    for p, q in zip(model.parameters(), twin_params):
        assert torch.equal(p, q)


def test_a_copy_does_not_take_the_schedulers_or_the_models_hooks_along():
    """An LR scheduler wraps the optimizer's step, and the model may hold hooks that cannot be
    pickled (lambdas): a copy is the optimizer's own state, as torch.optim's is."""
    make, loss_fn = MODELS["cnn"]
    model = make()
    model.register_forward_hook(lambda module, args, out: None)  # not picklable
    opt = dropmuon.DropMuon(model, lr=0.02, seed=5)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for s in range(2):
        step(model, opt, loss_fn, s)
        scheduler.step()
    twin = copy.deepcopy(opt)
    for p in (q for g in twin.param_groups for q in g["params"]):
        p.grad = torch.zeros_like(p)
    twin.step()
    assert twin.step_count == 3 and opt.step_count == 2  # the copy's step is its own
    again = pickle.loads(pickle.dumps(opt))
    assert again.step_count == 2 and again.layer_names() == opt.layer_names()
