"""DropMuon on a model sharded with FSDP2 (fully_shard), 2 processes on the gloo backend (CPU):
the paper's CNN on Fashion-MNIST, a checkpoint through torch.distributed.checkpoint half-way,
and a resume from it that reproduces the uninterrupted run.

    python examples/fsdp2.py [--steps 40] [--dataset fashion-mnist|synthetic] [--output DIR]

Each rank trains on its half of every batch. Parameters, gradients and optimizer state are
sharded (each rank holds half of every tensor's rows); layers below each step's cutoff get
no gradient and so no reduce-scatter; each active matrix is orthogonalized on one rank.
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import dropmuon
from dropmuon.compare.data import load_dataset
from dropmuon.compare.models import PaperCNN
from dropmuon.fsdp import release_device_meshes

WORLD = 2


def build(data, mesh):
    torch.manual_seed(0)  # the same initial model on every rank
    model = PaperCNN(data.in_channels, data.num_classes, data.image_size)
    for layer in [*model.features[::3], model.head]:  # the 3 convs and the head: one unit each
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # After sharding, on the sharded model; the same seed everywhere, so every rank draws the
    # same layers without communicating.
    opt = dropmuon.DropMuon(
        model, lr=0.05, weight_decay=0.0, fallback="adamw", adamw_lr=1e-3, seed=0
    )
    return model, opt


def train(model, opt, data, rank, start, stop, batch_size):
    loss_fn = nn.CrossEntropyLoss()
    for step in range(start, stop):
        order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(step))
        idx = order[:batch_size].chunk(WORLD)[rank]  # this rank's half of the global batch
        opt.zero_grad()
        loss = loss_fn(model(data.train_x[idx]), data.train_y[idx])
        loss.backward()  # stops at the cutoff; only the active layers are reduce-scattered
        opt.step()
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.3f}  next cutoff {opt.cutoff}")


def accuracy(model, data, rank) -> float:
    with torch.no_grad():
        x, y = data.test_x.chunk(WORLD)[rank], data.test_y.chunk(WORLD)[rank]
        counts = torch.tensor([(model(x).argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
    dist.all_reduce(counts)
    return float(counts[0] / counts[1])


def worker(rank, rendezvous, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    try:
        run(rank, args)
    finally:
        # DTensor's caches hold the device mesh and so the process group; without this the
        # group's gloo threads outlive destroy_process_group and can abort the exit.
        release_device_meshes()
        dist.destroy_process_group()


def run(rank, args):
    mesh = init_device_mesh("cpu", (WORLD,))
    data = load_dataset(args.dataset)
    half = args.steps // 2
    path = os.path.join(args.output, f"step{half}")

    model, opt = build(data, mesh)
    train(model, opt, data, rank, 0, half, args.batch_size)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=path)  # each rank writes its shards
    train(model, opt, data, rank, half, args.steps, args.batch_size)
    straight = [p.full_tensor() for p in model.parameters()]
    acc = accuracy(model, data, rank)

    model, opt = build(data, mesh)  # a fresh start, resumed from the checkpoint
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])  # DropMuon's step and sampler too
    train(model, opt, data, rank, half, args.steps, args.batch_size)
    same = all(torch.equal(a, p.full_tensor()) for a, p in zip(straight, model.parameters()))
    if rank == 0:
        print(f"test accuracy {acc:.4f}; updates per layer {opt.update_counts}")
        print(f"checkpoint at step {half} in {path}")
        print(f"resumed run equals the uninterrupted one bit for bit: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=256, help="global, over both ranks")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--output", default=None, help="checkpoint folder (default: a temp one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        args.output = args.output or scratch
        rendezvous = f"file://{os.path.join(scratch, 'rendezvous')}"  # no port to race for
        mp.start_processes(worker, args=(rendezvous, args), nprocs=WORLD, start_method="spawn")


if __name__ == "__main__":
    main()
