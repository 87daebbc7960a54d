"""Is a Drop-Muon forward pass slower than Muon's? (benchmarks/RESULTS.md section 3, question 5.)

The first edition of the report saw Drop-Muon runs' forward 5-20% slower than Muon's inside the
harness. This times the harness's forward (model + loss, autograd recording, as in training) of
the paper CNN at the study's batch size with the layers below a cutoff frozen, every cutoff
round-robin in the same process (so machine drift hits all alike), medians of several rounds;
then profiles cutoff 0 (Muon) and cutoff 2 with torch.profiler and lists the forward's operators.

    python3 benchmarks/profile_forward.py [--batch-size 256] [--rounds 7] > forward_profile.txt
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from dropmuon.compare.models import build_model
from dropmuon.layers.partition import module_layers


def set_cutoff(layers, cutoff: int) -> None:
    """What DropMuon's truncation does: the layers below the cutoff stop requiring grad."""
    for position, layer in enumerate(layers):
        for _, p in layer.params:
            p.requires_grad_(position >= cutoff)


def forward(model, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    del loss  # the graph (and the saved activations) go with it, as after a backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("paper-cnn", 1, 10, 28)
    layers = module_layers(model)  # registration order = forward order for this model
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    cutoffs = list(range(len(layers)))
    for cutoff in cutoffs:  # warm-up
        set_cutoff(layers, cutoff)
        forward(model, x, y)
    times = {c: [] for c in cutoffs}
    for _ in range(args.rounds):
        for cutoff in cutoffs:
            set_cutoff(layers, cutoff)
            start = time.perf_counter()
            for _ in range(args.per_round):
                forward(model, x, y)
            times[cutoff].append((time.perf_counter() - start) / args.per_round)
    print(
        f"paper CNN, batch {args.batch_size}, {args.threads} threads: forward (model + loss, "
        f"autograd recording), median of {args.rounds} rounds of {args.per_round}, cutoffs "
        "round-robin"
    )
    print()
    print("| cutoff | frozen layers | forward ms | vs cutoff 0 |")
    print("|---|---|---|---|")
    base = statistics.median(times[0])
    for cutoff in cutoffs:
        median = statistics.median(times[cutoff])
        print(f"| {cutoff} | {cutoff} | {median * 1e3:.1f} | {median / base:.3f} |")
    for cutoff in (0, 2):
        set_cutoff(layers, cutoff)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.per_round):
                forward(model, x, y)
        print()
        print(f"torch.profiler, cutoff {cutoff}, {args.per_round} forwards (self CPU time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    set_cutoff(layers, 0)


if __name__ == "__main__":
    main()
