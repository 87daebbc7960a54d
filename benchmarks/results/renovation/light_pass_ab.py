"""The light-pass row of bench_step as an A/B: run it alternately with PYTHONPATH pointing at a
checked-out older package and at this one (see README.md); prints the package folder and the
extra microseconds per module call of a forward + backward with DropMuon alive at cutoff 0."""

import statistics
import timeit

import torch
from torch import nn

import dropmuon


class EveryLayer:
    """Cutoff 0 at every step (the light pass: nothing frozen, the hooks still alive)."""

    kind = "fixed"

    def sample(self, step, num_layers):
        return [True] * num_layers


def median_seconds(fn, repeats: int) -> float:
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeats))


def main() -> None:
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Linear(4, 4) for _ in range(200)])
    x = torch.randn(1, 4)

    def pass_():
        stack(x).sum().backward()

    plain, light = [], []
    for _ in range(20):
        plain.append(median_seconds(pass_, 5))
        opt = dropmuon.DropMuon(stack, sampling=EveryLayer())
        for _ in range(2):  # the traced first step, then one in the light pass
            pass_()
            opt.step()
        light.append(median_seconds(pass_, 5))
        del opt
    per_call = (statistics.median(light) - statistics.median(plain)) / 201
    print(dropmuon.__file__.split("/")[2], f"{per_call * 1e6:.2f} us/call")


if __name__ == "__main__":
    main()
