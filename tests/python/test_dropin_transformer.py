"""Issue 22, finding 9: the README's first example, unchanged, trains what users bring: torch's
nn.TransformerEncoder language model (word_language_model's architecture) on word-like tokens,
and a CNN. dropmuon 0.1's default (sign updates for biases and norm gains) left a word-level
model far from what it could learn: every bias of its large output layer moved by the full lr
at every step (benchmarks/RESULTS.md, "Defaults")."""

import math

import torch
from dropin import TransformerLM, cnn, cnn_loss, step
from torch import nn

import dropmuon

VOCAB, CONTEXT, BATCH = 2000, 16, 16
ZIPF = 1.0 / torch.arange(1, VOCAB + 1).double()
ZIPF /= ZIPF.sum()
ENTROPY = float(-(ZIPF * ZIPF.log()).sum())  # the best loss on this text: 5.62 nats


def zipf_batch(step):
    """Word-like tokens: drawn from a Zipf distribution over 2,000 words (no context helps)."""
    g = torch.Generator().manual_seed(3000 + step)
    tokens = torch.multinomial(ZIPF, BATCH * (CONTEXT + 1), replacement=True, generator=g)
    tokens = tokens.view(BATCH, CONTEXT + 1)
    return tokens[:, :-1], tokens[:, 1:]


def readme_example(model):
    return dropmuon.DropMuon(model, lr=0.05, sampling="uniform")  # the README's first line


def test_the_readme_example_trains_a_word_level_transformer():
    model = TransformerLM(vocab=VOCAB, d=32, heads=2, layers=1, context=CONTEXT)
    opt = readme_example(model)
    for s in range(100):
        x, y = zipf_batch(s)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
    with torch.no_grad():
        held_out = [zipf_batch(10_000 + s) for s in range(8)]
        loss = sum(
            nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
            for x, y in held_out
        ) / len(held_out)
    assert math.log(VOCAB) - loss > 1.8  # from 7.60 (uniform) ...
    assert loss < ENTROPY + 0.12  # ... to within 0.12 nats of the best possible


def test_the_readme_example_trains_a_cnn():
    model = cnn()
    opt = readme_example(model)
    first = step(model, opt, cnn_loss, 0)
    for s in range(1, 40):
        last = step(model, opt, lambda m, _: cnn_loss(m, 0), s)  # one batch: memorised
    assert last < 0.2 * first
