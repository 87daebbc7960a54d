"""A plain training loop the optimizer tests share (imported as ``from training import ...``)."""

from torch import nn


def train_steps(model, opt, batch, steps, start=0, scheduler=None) -> list:
    """``steps`` cross-entropy steps on ``batch(s)`` for s = start, start + 1, ...; the cutoff
    each step ran with."""
    cutoffs = []
    for s in range(start, start + steps):
        cutoffs.append(opt.cutoff)
        x, y = batch(s)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler:
            scheduler.step()
    return cutoffs
