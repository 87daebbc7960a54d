"""DropMuon's warnings for stacks that silently defeat it (dropmuon.diagnostics): an active
layer without a gradient (reentrant activation checkpointing first), truncation defeated by an
input that requires grad; once per cause, in categories of their own; never on a plain model."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import dropmuon
from dropmuon import DropMuonWarning, NoGradientWarning, TruncationDefeatedWarning
from dropmuon.compare.models import PaperCNN, ResNet18


class Checkpointed(nn.Module):
    """The reproducer of the issue: a stem outside checkpointing, three checkpointed
    Linear+Tanh blocks, a head."""

    def __init__(self, use_reentrant: bool, sequential: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3)]
        )
        self.head = nn.Linear(16, 4)
        self.use_reentrant, self.sequential = use_reentrant, sequential

    def forward(self, x):
        h = self.stem(x)
        if self.sequential:
            # checkpoint_sequential without use_reentrant is reentrant (torch warns about it).
            kwargs = {} if self.use_reentrant else {"use_reentrant": False}
            h = checkpoint_sequential(self.blocks, 3, h, **kwargs)
        else:
            for block in self.blocks:
                h = checkpoint(block, h, use_reentrant=self.use_reentrant)
        return self.head(h)


def train(model, steps=6, x=None, **options):
    torch.manual_seed(0)
    opt = dropmuon.DropMuon(model, lr=0.02, **options)
    for _ in range(steps):
        inputs = torch.randn(4, 8) if x is None else x()
        opt.zero_grad()
        model(inputs).square().mean().backward()
        opt.step()
    return opt


def dropmuon_warnings(record):
    return [w for w in record if issubclass(w.category, DropMuonWarning)]


def test_the_categories_share_one_base():
    assert issubclass(NoGradientWarning, DropMuonWarning)
    assert issubclass(TruncationDefeatedWarning, DropMuonWarning)
    assert issubclass(DropMuonWarning, UserWarning)


@pytest.mark.parametrize("sequential", [False, True], ids=["checkpoint", "checkpoint_sequential"])
def test_reentrant_checkpointing_is_reported_naming_the_layer(sequential):
    torch.manual_seed(0)
    model = Checkpointed(use_reentrant=True, sequential=sequential)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = train(model, steps=12)
    ours = dropmuon_warnings(record)
    assert ours and all(w.category is NoGradientWarning for w in ours)
    text = str(ours[0].message)
    assert "blocks." in text and "use_reentrant=False" in text and "reentrant" in text
    # Once per layer: as many warnings as distinct layers named.
    named = [str(w.message).split("(")[1].split(")")[0] for w in ours]
    assert len(named) == len(set(named))
    # What it reports is real: the same draws without reentrancy update the blocks more often.
    torch.manual_seed(0)
    plain = train(Checkpointed(use_reentrant=False, sequential=sequential), steps=12)
    assert sum(opt.update_counts[1:4]) < sum(plain.update_counts[1:4])
    assert opt.update_counts[-1] == plain.update_counts[-1] == 12


def test_non_reentrant_checkpointing_is_silent_and_updates_the_blocks():
    torch.manual_seed(0)
    model = Checkpointed(use_reentrant=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropMuonWarning)
        opt = train(model, steps=12)
    # Every active layer was updated at every step it was active: counts rise towards the head.
    assert opt.update_counts == sorted(opt.update_counts)
    assert opt.update_counts[-1] == 12


@pytest.mark.parametrize("sampling", ["uniform", "tau_nice", "epoch_shift", "full"])
@pytest.mark.parametrize("build", [PaperCNN, lambda: ResNet18(width=4)], ids=["cnn", "resnet"])
def test_a_plain_model_gets_no_warning(build, sampling):
    torch.manual_seed(0)
    model = build()
    options = dict(tau=2) if sampling == "tau_nice" else {}
    options.update(total_steps=8) if sampling == "epoch_shift" else None
    opt = dropmuon.DropMuon(model, lr=0.02, sampling=sampling, **options)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropMuonWarning)
        cutoffs = []
        for _ in range(8):
            cutoffs.append(opt.cutoff)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert sampling == "full" or max(cutoffs) > 0  # frozen layers were there to be checked


def test_an_input_that_requires_grad_is_reported_once():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )
    opt = dropmuon.DropMuon(model, lr=0.02, sampling=[0.0, 0.0, 1.0])  # cutoff 2 always
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(4):
            x = torch.randn(4, 8, requires_grad=True)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            assert model[0].weight.grad is None  # frozen, yet the backward ran through it
            assert x.grad is not None
    ours = dropmuon_warnings(record)
    assert [w.category for w in ours] == [TruncationDefeatedWarning]
    text = str(ours[0].message)
    assert "cutoff layer 2 (4)" in text and "The model's input requires grad" in text
    assert "enable_input_require_grads" not in text and "does not manage" not in text


def test_an_input_that_requires_grad_at_cutoff_0_is_fine():
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = dropmuon.DropMuon(model, lr=0.02, sampling="full")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropMuonWarning)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 8, requires_grad=True)).sum().backward()
            opt.step()


def test_a_step_before_any_backward_is_not_a_missing_gradient():
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = dropmuon.DropMuon(model, lr=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropMuonWarning)
        opt.step()  # e.g. a scheduler warm-up step before training: nothing to report
