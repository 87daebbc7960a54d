"""Issue 22, findings 2-4: requires_grad is the user's. DropMuon's freezes last one forward pass
and never leak out (user code filtering p.requires_grad between steps sees every parameter);
Muon never changes a flag; a parameter the user froze, before or after construction, stays
frozen and is not updated; frozen parameters are accepted in parameter lists; a second
optimizer on the same parameters gets full gradients."""

import pytest
import torch
from dropin import MODELS, cnn, cnn_loss, step

import dropmuon

CLASSES = [dropmuon.DropMuon, dropmuon.Muon]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("name", list(MODELS))
def test_flags_between_steps_are_the_users(cls, name):
    make, loss_fn = MODELS[name]
    model = make()
    opt = cls(model, lr=0.02, fallback="adamw")
    seen_frozen = False
    for s in range(6):
        # airbench rebuilds its optimizer groups from the trainable parameters between runs
        assert [p for p in model.parameters() if p.requires_grad] == list(model.parameters())
        seen_frozen |= not all(opt.active_layers)
        step(model, opt, loss_fn, s)
    assert seen_frozen or cls is dropmuon.Muon


def test_the_freeze_holds_during_the_forward_only():
    """Inside the forward the layers below the cutoff do not require grad (the backward stops
    there); once the outermost call returns the flags are back."""
    model = cnn()
    opt = dropmuon.DropMuon(model, sampling=[0.0, 1.0, 0.0])  # cutoff 1: layer 0 frozen
    step(model, opt, cnn_loss, 0)
    during = []
    handle = model[2].register_forward_pre_hook(
        lambda module, args: during.append([p.requires_grad for p in model.parameters()])
    )
    loss = cnn_loss(model, 1)
    handle.remove()
    assert during == [[False, False, True, True, True, True]]
    assert all(p.requires_grad for p in model.parameters())
    loss.backward()
    assert [p.grad is not None for p in model.parameters()] == [False] * 2 + [True] * 4


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_parameter_the_user_freezes_stays_frozen_and_unchanged(cls, when):
    """A fine-tuning script freezes the first conv: before building the optimizer (a module
    then leaves it out; a parameter list keeps it, as torch.optim does) or after (the next
    steps must neither unfreeze nor update it)."""
    for as_list in (False, True):
        model = cnn()
        frozen = model[0].weight
        if when == "before":
            frozen.requires_grad_(False)
        opt = cls(list(model.parameters()) if as_list else model, lr=0.05, fallback="adamw")
        step(model, opt, cnn_loss, 0)
        if when == "after":
            frozen.requires_grad_(False)
            frozen.grad = None
        start = frozen.detach().clone()
        for s in range(1, 8):
            step(model, opt, cnn_loss, s)
            assert not frozen.requires_grad
        assert torch.equal(frozen, start)
        assert all(p.requires_grad for p in model.parameters() if p is not frozen)


def test_frozen_parameters_are_accepted_in_a_list_and_skipped_without_grad():
    """torch's "step is a no-op without gradients": tensors that do not require grad."""
    params = [torch.randn(2, 3), torch.randn(2, 3)]
    start = [p.clone() for p in params]
    for cls in CLASSES:
        opt = cls(params, lr=0.1)
        assert opt.step(lambda: torch.tensor([1.0])).item() == 1.0
        assert all(torch.equal(a, b) for a, b in zip(params, start))


@pytest.mark.parametrize("drop_first", [True, False])
def test_a_second_optimizer_on_the_same_model_gets_full_gradients(drop_first):
    """Switching optimizers: with the DropMuon dropped, the next forward is already full; kept
    alive, it stops freezing once another optimizer steps its parameters (README)."""
    model = cnn()
    first = dropmuon.DropMuon(model, lr=0.02, sampling=[0.0, 0.0, 1.0])
    for s in range(2):
        step(model, first, cnn_loss, s)
    if drop_first:
        del first
    second = torch.optim.SGD(model.parameters(), lr=0.01)
    full_from = 0 if drop_first else 1
    for s in range(3):
        second.zero_grad()
        cnn_loss(model, s).backward()
        if s >= full_from:
            assert all(p.grad is not None for p in model.parameters())
        second.step()


def test_a_new_dropmuon_on_a_trained_model_sees_every_layer():
    model = cnn()
    opt = dropmuon.DropMuon(model, lr=0.02, sampling=[0.0, 0.0, 1.0])
    for s in range(3):
        step(model, opt, cnn_loss, s)
    assert dropmuon.DropMuon(model).num_layers == opt.num_layers == 3
    trainable = dropmuon.DropMuon([p for p in model.parameters() if p.requires_grad])
    step(model, trainable, cnn_loss, 3)  # its layers are found at the first forward
    assert trainable.num_layers == 3


def test_an_interrupted_forward_is_mended_by_the_next_step_or_unfreeze():
    """A KeyboardInterrupt inside the forward (a notebook's stop button) bypasses torch's
    always-called hooks: the freeze stays until the next step() or unfreeze() ends it."""

    model = cnn()
    opt = dropmuon.DropMuon(model, sampling=[0.0, 0.0, 1.0])
    step(model, opt, cnn_loss, 0)

    def interrupt(module, args):
        raise KeyboardInterrupt

    for mend in ("unfreeze", "step"):
        handle = model[2].register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            cnn_loss(model, 1)
        handle.remove()
        assert not model[0].weight.requires_grad  # stuck mid-forward
        if mend == "unfreeze":
            opt.unfreeze()
        else:
            opt.step()
        assert all(p.requires_grad for p in model.parameters())
        opt.zero_grad()
        cnn_loss(model, 2).backward()  # and the next forward freezes (or not) as it should
        frozen = mend == "step"
        assert (model[0].weight.grad is None) == frozen
        opt.step()


def test_an_interrupted_forward_is_mended_even_when_its_optimizer_is_gone():
    """Ctrl-C in a forward, then the optimizer rebuilt: the new one sees every parameter (the
    old freeze is lifted before it reads requires_grad), and the model carries no hook."""
    model = cnn()
    opt = dropmuon.DropMuon(model, sampling=[0.0, 0.0, 1.0])
    step(model, opt, cnn_loss, 0)
    handle = model[5].register_forward_pre_hook(
        lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    with pytest.raises(KeyboardInterrupt):
        cnn_loss(model, 1)
    handle.remove()
    del opt
    opt = dropmuon.DropMuon(model, lr=0.02)
    assert all(p.requires_grad for p in model.parameters())
    assert opt.num_layers == 3
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
