"""DropMuon under FSDP2 (fully_shard) on 2 gloo ranks (CPU): bytes and time per step.

For each model, DropMuon (uniform) and Muon (every layer), each with the owner-computes update
(``fsdp_update="owner"``) and the all-gather baseline (``"all_gather"``):

  - bytes each rank sends per step, by collective (dropmuon.fsdp.CollectiveCounter: what one
    rank sends to the others in a bandwidth-optimal algorithm): fully_shard's all-gathers
    (forward and backward) and reduce-scatters, the optimizer's all-to-alls or all-gathers,
    and its one small all-reduce (the NaN/Inf verdict);
  - time per step: forward + backward, and the optimizer step, each the median over the timed
    steps of the slower rank's time, then the median over --rounds rounds (configurations run
    in turn within each round, so that drift in the machine's speed hits them alike);
  - optimizer-state bytes per rank, next to the same optimizer's state on the unsharded model.

The byte counts come from separate, untimed steps (counting intercepts every operator), with
the same seed and so the same draws as the timed ones.

    python benchmarks/bench_fsdp.py [--steps 12] [--rounds 3] [--output results/fsdp/bench.md]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dropmuon
from dropmuon.compare.models import PaperCNN
from dropmuon.distributed import fsdp
from dropmuon.dtensors import local_tensor

WORLD = 2
BATCH = 64  # per rank
MODELS = {
    "paper CNN (MNIST 28x28, 64-128-256)": (
        lambda: PaperCNN(1, 10, 28),
        lambda g: torch.randn(BATCH, 1, 28, 28, generator=g),
        lambda m: list(m.features[::3]) + [m.head],
    ),
    "MLP 6 x 512": (
        lambda: nn.Sequential(
            *[m for _ in range(5) for m in (nn.Linear(512, 512), nn.ReLU())], nn.Linear(512, 10)
        ),
        lambda g: torch.randn(BATCH, 512, generator=g),
        lambda m: list(m[::2]),
    ),
}
CONFIGS = [
    ("DropMuon uniform", "uniform", "owner"),
    ("DropMuon uniform", "uniform", "all_gather"),
    ("Muon", "full", "owner"),
    ("Muon", "full", "all_gather"),
]
OPTIONS = dict(lr=0.02, seed=1, ns_precision="native")


def build(model_name: str, sampling: str, mode: str, mesh):
    from torch.distributed.fsdp import fully_shard

    make, _, layers = MODELS[model_name]
    torch.manual_seed(0)
    model = make()
    for layer in layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, dropmuon.DropMuon(model, sampling=sampling, fsdp_update=mode, **OPTIONS)


def batch(model_name: str, step: int, rank: int):
    g = torch.Generator().manual_seed(step * WORLD + rank)
    return MODELS[model_name][1](g), torch.randint(0, 10, (BATCH,), generator=g)


def one_step(model, opt, x, y, counters=None) -> tuple[float, float]:
    """Times (forward + backward, optimizer step); ``counters`` (two CollectiveCounters) count
    the two phases instead."""
    backward_phase, step_phase = counters or (nullcontext(), nullcontext())
    start = time.perf_counter()
    with backward_phase:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
    middle = time.perf_counter()
    with step_phase:
        opt.step()
    return middle - start, time.perf_counter() - middle


def slowest(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def state_bytes(opt) -> int:
    total = 0
    for s in opt.state.values():
        for t in s.values():
            if isinstance(t, torch.Tensor):
                local = local_tensor(t)
                total += local.numel() * local.element_size()
    return total


def _worker(rank, port, workdir, steps, rounds):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    mesh = init_device_mesh("cpu", (WORLD,))
    rows = []
    for model_name in MODELS:
        times = {config: [] for config in CONFIGS}
        for _ in range(rounds):
            for config in CONFIGS:
                model, opt = build(model_name, config[1], config[2], mesh)
                for s in range(2):  # warm-up (the first forward orders the layers)
                    one_step(model, opt, *batch(model_name, s, rank))
                per_step = [
                    [slowest(t) for t in one_step(model, opt, *batch(model_name, s, rank))]
                    for s in range(2, 2 + steps)
                ]
                times[config].append([statistics.median(column) for column in zip(*per_step)])
        for config in CONFIGS:
            model, opt = build(model_name, config[1], config[2], mesh)
            counters = (fsdp.CollectiveCounter(WORLD), fsdp.CollectiveCounter(WORLD))
            cutoffs = []
            for s in range(2 + steps):
                cutoffs.append(opt.cutoff)
                if s == 2:
                    for counter in counters:
                        counter.reset()
                one_step(model, opt, *batch(model_name, s, rank), counters)
            backward, step = (statistics.median(column) for column in zip(*times[config]))
            rows.append(
                dict(
                    model=model_name,
                    optimizer=config[0],
                    mode=config[2],
                    backward_s=backward,
                    step_s=step,
                    backward_sent={k: v / steps for k, v in counters[0].sent.items()},
                    step_sent={k: v / steps for k, v in counters[1].sent.items()},
                    state_bytes=state_bytes(opt),
                    mean_cutoff=statistics.mean(cutoffs[2:]),
                )
            )
        if rank == 0:  # the same optimizer on the unsharded model, every layer's state made
            torch.manual_seed(0)
            model = MODELS[model_name][0]()
            opt = dropmuon.DropMuon(model, sampling="full", **OPTIONS)
            one_step(model, opt, *batch(model_name, 0, 0))
            rows.append(dict(model=model_name, unsharded_state_bytes=state_bytes(opt)))
    if rank == 0:
        torch.save(rows, os.path.join(workdir, "rows.pt"))
    fsdp.release_device_meshes()  # so that destroy_process_group frees the group's threads
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(rows) -> str:
    mb = 1e6
    lines = []
    for model_name in MODELS:
        unsharded = next(
            r["unsharded_state_bytes"]
            for r in rows
            if r["model"] == model_name and "unsharded_state_bytes" in r
        )
        lines += [
            f"### {model_name}",
            "",
            f"Optimizer state of the unsharded model: {unsharded / mb:.2f} MB. Mean cutoff of "
            "the counted steps: "
            + ", ".join(
                f"{r['optimizer']} {r['mode']} {r['mean_cutoff']:.2f}"
                for r in rows
                if r["model"] == model_name and "optimizer" in r
            )
            + ".",
            "",
            "| optimizer | update | fwd+bwd s | step s | fsdp all-gather MB | reduce-scatter MB "
            "| optimizer exchange MB | all-reduce B | state MB/rank (rank 0) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["model"] != model_name or "optimizer" not in r:
                continue
            fsdp_sent, step_sent = r["backward_sent"], r["step_sent"]
            exchange = step_sent.get("all_to_all", 0.0) + step_sent.get("all_gather", 0.0)
            lines.append(
                f"| {r['optimizer']} | {r['mode']} | {r['backward_s']:.4f} | {r['step_s']:.4f} "
                f"| {fsdp_sent.get('all_gather', 0.0) / mb:.3f} "
                f"| {fsdp_sent.get('reduce_scatter', 0.0) / mb:.3f} | {exchange / mb:.3f} "
                f"| {step_sent.get('all_reduce', 0.0):.0f} | {r['state_bytes'] / mb:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        mp.start_processes(
            _worker,
            args=(_free_port(), workdir, args.steps, args.rounds),
            nprocs=WORLD,
            start_method="spawn",
        )
        rows = torch.load(os.path.join(workdir, "rows.pt"))
    text = table(rows)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
