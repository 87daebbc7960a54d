"""Models and loops the drop-in tests share (issue 22): a small CNN, and word_language_model's
transformer (torch's nn.TransformerEncoder, as every torch tutorial builds it)."""

import torch
from torch import nn

from dropmuon.compare.models import WordTransformer


class FixedCutoff:
    """A user sampler: always the same cutoff."""

    def __init__(self, cutoff: int) -> None:
        self.cutoff = cutoff

    def sample(self, step, num_layers):
        return [i >= self.cutoff for i in range(num_layers)]


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 5),
    )


def cnn_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def TransformerLM(vocab=12, d=16, heads=2, layers=2, context=8, seed=0):  # noqa: N802
    """pytorch/examples' word_language_model TransformerModel, small."""
    torch.manual_seed(seed)
    return WordTransformer(vocab, d, heads, layers, context, ff_mult=2)


def lm_batch(step, vocab=12, context=8, batch=6):
    """Sequences that count up modulo ``vocab`` from a random start: learnable in a few steps."""
    g = torch.Generator().manual_seed(2000 + step)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    tokens = (start + torch.arange(context + 1)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


def lm_loss(model, step):
    x, y = lm_batch(step)
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def cnn_loss(model, step):
    x, y = cnn_batch(step)
    return nn.functional.cross_entropy(model(x), y)


MODELS = {"cnn": (cnn, cnn_loss), "transformer": (TransformerLM, lm_loss)}


def step(model, opt, loss_fn, s):
    opt.zero_grad()
    loss = loss_fn(model, s)
    loss.backward()
    opt.step()
    return loss.item()


def assert_twins_agree(original, twin, loss_fn, steps):
    """Steps two (model, optimizer) pairs on the same batches: each step they must draw the same
    layers, and at the end their parameters must be equal."""
    (model, opt), (model2, opt2) = original, twin
    for s in steps:
        assert opt2.active_layers == opt.active_layers
        step(model, opt, loss_fn, s)
        step(model2, opt2, loss_fn, s)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


class BlockNet(nn.Module):
    """A stem, two repeated blocks in an nn.ModuleList and a head: four depth units with
    ``layers="blocks"`` (the DDP and FSDP2 tests)."""

    def __init__(self, inputs: int, width: int, hidden: int, classes: int):
        super().__init__()
        self.stem = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, width))
            for _ in range(2)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.tanh(self.stem(x.flatten(1)))
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)
