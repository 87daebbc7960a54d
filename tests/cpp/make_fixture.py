"""Writes the fixture of the C++ frontend's GoogleTests (tests/cpp/test_optimizer.cpp): a small
CNN's initial weights, a few batches, and the Python optimizer's trajectory (every parameter
after every step, and each step's active layers) for each case the C++ test replays.

    python3 tests/cpp/make_fixture.py OUT.pt

One thread, as the C++ test runs: the forward and backward products are then the same
operations in the same order in both languages, so the trajectories agree bit for bit.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import dropmuon

STEPS = 6
BATCH = 16


class Net(nn.Module):
    """The C++ test's Net: the same layers, registered in the same order (input first)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.fc1 = nn.Linear(72, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def groups(net: Net) -> list[dict]:
    """Case "groups": explicit layer indices, one layer split over two groups with its own lr."""
    return [
        {"params": [net.conv1.weight, net.conv1.bias], "layer": 10},
        {"params": [net.conv2.weight], "layer": 20, "lr": 0.01},
        {"params": [net.conv2.bias], "layer": 20},
        {"params": [net.fc1.weight, net.fc1.bias], "layer": 30},
        {"params": [net.fc2.weight, net.fc2.bias], "layer": 40},
    ]


# The C++ test builds the same optimizers (test_optimizer.cpp, make_case).
CASES = {
    "uniform": lambda net: dropmuon.DropMuon(
        net, lr=0.02, sampling="uniform", seed=3, fallback="sign"
    ),
    "muon": lambda net: dropmuon.Muon(net, lr=0.02),
    "tau_nice_adamw": lambda net: dropmuon.DropMuon(
        net,
        lr=0.03,
        sampling="tau_nice",
        tau=2,
        seed=5,
        fallback="adamw",
        nesterov=False,
        adamw_lr=0.001,
    ),  # fmt: skip
    "epoch_shift_polar": lambda net: dropmuon.DropMuon(
        net,
        lr=0.02,
        sampling="epoch_shift",
        total_steps=STEPS,
        seed=1,
        weight_decay=0.05,
        ns_coefficients="polar_express",
        adjust_lr_fn="match_rms_adamw",
        ns_precision="native",
    ),  # fmt: skip
    "groups": lambda net: dropmuon.DropMuon(
        groups(net), lr=0.02, sampling=[0.4, 0.3, 0.2, 0.1], seed=7
    ),
}


def main(path: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    init = Net()
    fixture = {f"init/{n}": p.detach().clone() for n, p in init.named_parameters()}
    fixture["x"] = torch.randn(STEPS * BATCH, 1, 12, 12)
    fixture["y"] = torch.randint(0, 10, (STEPS * BATCH,))
    for case, build in CASES.items():
        net = Net()
        net.load_state_dict(init.state_dict())
        opt = build(net)
        for step in range(STEPS):
            fixture[f"{case}/mask/{step}"] = torch.tensor(opt.active_layers)
            x = fixture["x"][step * BATCH : (step + 1) * BATCH]
            y = fixture["y"][step * BATCH : (step + 1) * BATCH]
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            for n, p in net.named_parameters():
                fixture[f"{case}/{step}/{n}"] = p.detach().clone()
    torch.save(fixture, path)
    print(f"wrote {path}: {len(CASES)} cases x {STEPS} steps")


if __name__ == "__main__":
    main(sys.argv[1])
