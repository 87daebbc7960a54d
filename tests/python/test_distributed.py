"""DropMuon under data parallelism: 2 processes on gloo (CPU), DDP and the active-only modes of
dropmuon.distributed, checked against a single process on the concatenated batch.

All scenarios run in one spawn (importing torch twice costs more than the scenarios) with a
deadline (multiprocess.py), so a hang fails the test instead of stalling the suite. Run this
file as a script to print the bytes all-reduced per step for the comparison models
(RELIABILITY.md)."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
from dropin import BlockNet
from multiprocess import WORLD, collect, run_scenarios, spawn
from torch import nn

import dropmuon
from dropmuon import distributed as dmd

STEPS = 6
RESUME_AT = 3
OPTIONS = dict(lr=0.05, weight_decay=0.01, ns_precision="native", seed=3)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 32),
        nn.Tanh(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 5),
    )


def make_block_model():
    torch.manual_seed(0)
    return BlockNet(12, 32, 32, 5)


def global_batch(step):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(8 * WORLD, 12, generator=g), torch.randint(0, 5, (8 * WORLD,), generator=g)


def shard(step, rank):
    x, y = global_batch(step)
    return x[8 * rank : 8 * rank + 8], y[8 * rank : 8 * rank + 8]


def train(forward, model, opt, steps, start=0, batch=global_batch, sync=None):
    cutoffs = []
    for s in range(start, start + steps):
        x, y = batch(s)
        cutoffs.append(opt.cutoff)
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        if sync is not None:
            sync()
        opt.step()
    return cutoffs


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------------------------
# The workers
# ----------------------------------------------------------------------------------------------


def _scenarios(rank, workdir):
    out = {}
    batch = lambda s: shard(s, rank)  # noqa: E731

    # Plain DDP (counted through a hook that does what DDP's default does).
    model = make_model()
    opt = dropmuon.DropMuon(model, **OPTIONS)
    stats = dmd.CommStats()
    ddp = dmd.wrap_ddp(model, opt, active_only=False, stats=stats)
    cutoffs = train(ddp, model, opt, STEPS, batch=batch)
    out["ddp"] = dict(params=snapshot(model), cutoffs=cutoffs, bytes=stats.bytes, steps=stats.steps)

    # Active-only hook, small buckets: frozen buckets are skipped, partial ones narrowed; a
    # checkpoint in the middle (rank 0 writes it) for the world-size test.
    model = make_model()
    opt = dropmuon.DropMuon(model, **OPTIONS)
    stats = dmd.CommStats()
    ddp = dmd.wrap_ddp(model, opt, stats=stats, bucket_cap_mb=0.002)
    cutoffs = train(ddp, model, opt, RESUME_AT, batch=batch)
    if rank == 0:
        torch.save([model.state_dict(), opt.state_dict()], os.path.join(workdir, "ckpt.pt"))
    cutoffs += train(ddp, model, opt, STEPS - RESUME_AT, start=RESUME_AT, batch=batch)
    out["active"] = dict(
        params=snapshot(model), cutoffs=cutoffs, bytes=stats.bytes, steps=stats.steps
    )

    # Active-only hook, one bucket, tau_nice: the active parts are not adjacent (packed).
    model = make_model()
    opt = dropmuon.DropMuon(model, sampling="tau_nice", tau=2, **OPTIONS)
    stats = dmd.CommStats()
    ddp = dmd.wrap_ddp(model, opt, stats=stats)
    cutoffs = train(ddp, model, opt, STEPS, batch=batch)
    out["tau_nice"] = dict(params=snapshot(model), cutoffs=cutoffs, bytes=stats.bytes)

    # Depth units (layers="blocks") under the active-only hook, small buckets.
    model = make_block_model()
    opt = dropmuon.DropMuon(model, layers="blocks", **OPTIONS)
    stats = dmd.CommStats()
    ddp = dmd.wrap_ddp(model, opt, stats=stats, bucket_cap_mb=0.002)
    cutoffs = train(ddp, model, opt, STEPS, batch=batch)
    out["blocks"] = dict(
        params=snapshot(model), cutoffs=cutoffs, bytes=stats.bytes, names=opt.layer_names()
    )

    # A parameter-group optimizer: nothing is frozen between forward passes, so DDP registers
    # every parameter (0.1 froze layers at construction, which wrap_ddp had to undo).
    model = make_model()
    opt = dropmuon.DropMuon(
        [{"params": list(m.parameters()), "layer": i} for i, m in enumerate(model[::2])],
        **OPTIONS,
    )
    assert all(p.requires_grad for p in model.parameters())
    ddp = dmd.wrap_ddp(model, opt)
    train(ddp, model, opt, STEPS, batch=batch)
    out["param_list"] = dict(params=snapshot(model))

    # No DDP: broadcast once, all-reduce the active gradients after each backward.
    model = make_model()
    with torch.no_grad():  # different initialisations: the broadcast must fix them
        for p in model.parameters():
            p.add_(rank)
    dmd.broadcast_parameters(model)
    opt = dropmuon.DropMuon(model, **OPTIONS)
    stats = dmd.CommStats()
    sync = lambda: dmd.all_reduce_gradients(opt, stats=stats)  # noqa: E731
    cutoffs = train(model, model, opt, STEPS, batch=batch, sync=sync)
    out["helper"] = dict(params=snapshot(model), cutoffs=cutoffs, bytes=stats.bytes)

    # A single-process checkpoint loaded on both ranks continues in lockstep.
    model = make_model()
    opt = dropmuon.DropMuon(model, **OPTIONS)
    model_state, opt_state = torch.load(os.path.join(workdir, "single.pt"), weights_only=True)
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    ddp = dmd.wrap_ddp(model, opt)  # check_replicas passes
    cutoffs = train(ddp, model, opt, STEPS - RESUME_AT, start=RESUME_AT, batch=batch)
    out["from_single"] = dict(params=snapshot(model), cutoffs=cutoffs)

    # Replicas that disagree fail clearly, on every rank.
    model = make_model()
    opt = dropmuon.DropMuon(model, **{**OPTIONS, "seed": OPTIONS["seed"] + rank})
    try:
        dmd.wrap_ddp(model, opt)
        out["mismatch"] = None
    except RuntimeError as error:
        out["mismatch"] = str(error)
    try:
        dmd.wrap_ddp(model, opt, static_graph=True)
        out["static_graph"] = None
    except ValueError as error:
        out["static_graph"] = str(error)
    return out


def _worker(rank, port, workdir):
    run_scenarios(rank, port, workdir, _scenarios)


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------


def single_process(steps, start=0, state=None, make=make_model, **options):
    """The reference: one process on the concatenated batch."""
    model = make()
    opt = dropmuon.DropMuon(model, **{**OPTIONS, **options})
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
    cutoffs = train(model, model, opt, steps, start=start)
    return model, opt, cutoffs


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as workdir:
        model, opt, _ = single_process(RESUME_AT)
        torch.save([model.state_dict(), opt.state_dict()], os.path.join(workdir, "single.pt"))
        ranks = collect(_worker, workdir)
        checkpoint = torch.load(os.path.join(workdir, "ckpt.pt"), weights_only=True)
    return ranks, checkpoint


def assert_params_close(a, b, tolerance=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tolerance, atol=tolerance)


SCENARIOS = ["ddp", "active", "tau_nice", "blocks", "param_list", "helper", "from_single"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_ranks_hold_identical_parameters(runs, name):
    ranks, _ = runs
    for a, b in zip(ranks[0][name]["params"], ranks[1][name]["params"]):
        assert torch.equal(a, b), name


def test_every_rank_draws_the_same_cutoffs_without_communicating(runs):
    ranks, _ = runs
    _, _, expected = single_process(STEPS)
    for rank in ranks:
        for name in ("ddp", "active", "helper"):
            assert rank[name]["cutoffs"] == expected
    assert len(set(expected)) > 1


def test_data_parallel_equals_one_process_on_the_concatenated_batch(runs):
    ranks, _ = runs
    model, _, _ = single_process(STEPS)
    reference = snapshot(model)
    start = snapshot(make_model())
    assert max((a - s).abs().max() for a, s in zip(reference, start)) > 1e-2  # it trained
    for name in ("ddp", "active", "param_list", "helper"):
        assert_params_close(ranks[0][name]["params"], reference)
    # The modes sum the same two halves in the same order: bit for bit the same.
    for name in ("active", "param_list", "helper"):
        for a, b in zip(ranks[0][name]["params"], ranks[0]["ddp"]["params"]):
            assert torch.equal(a, b), name
    model, _, _ = single_process(STEPS, sampling="tau_nice", tau=2)
    assert_params_close(ranks[0]["tau_nice"]["params"], snapshot(model))


def layer_bytes():
    return [sum(p.numel() * 4 for p in m.parameters()) for m in make_model()[::2]]


def test_active_only_sends_only_the_active_layers(runs):
    ranks, _ = runs
    sizes = layer_bytes()
    for rank in ranks:
        ddp, active = rank["ddp"], rank["active"]
        assert ddp["steps"] == active["steps"] == STEPS
        assert ddp["bytes"] == STEPS * sum(sizes)  # plain DDP: every layer, every step
        expected = sum(sum(sizes[c:]) for c in active["cutoffs"])
        assert active["bytes"] == expected < ddp["bytes"]
        # Without DDP: the same payload plus one flag per active parameter tensor.
        flags = sum(4 * 2 * (len(sizes) - c) for c in rank["helper"]["cutoffs"])
        assert rank["helper"]["bytes"] == expected + flags
        # tau_nice: exactly the tau drawn layers, wherever they sit in the one bucket.
        sampler = dropmuon.LayerSampler("tau_nice", len(sizes), seed=OPTIONS["seed"], tau=2)
        masks = [sampler.sample(s) for s in range(STEPS)]
        assert any(mask != sorted(mask) for mask in masks)  # some with a gap (packed)
        expected = sum(size for mask in masks for size, on in zip(sizes, mask) if on)
        assert rank["tau_nice"]["bytes"] == expected


def test_checkpoint_moves_between_world_sizes(runs):
    ranks, checkpoint = runs
    # Saved by rank 0 of 2, continued in one process on the concatenated batch.
    model, opt, cutoffs = single_process(STEPS - RESUME_AT, start=RESUME_AT, state=checkpoint)
    assert checkpoint[1]["param_groups"][0]["dropmuon"]["world_size"] == WORLD
    assert cutoffs == ranks[0]["active"]["cutoffs"][RESUME_AT:]
    assert_params_close(snapshot(model), ranks[0]["active"]["params"])
    # Saved by one process, continued on 2 ranks.
    model, _, cutoffs = single_process(STEPS)
    assert ranks[0]["from_single"]["cutoffs"] == cutoffs[RESUME_AT:]
    assert_params_close(ranks[0]["from_single"]["params"], snapshot(model))


def test_disagreeing_replicas_and_static_graph_fail_clearly(runs):
    ranks, _ = runs
    for rank in ranks:
        assert rank["mismatch"] is not None and "replicas disagree" in rank["mismatch"]
        assert "rank 1: step 0" in rank["mismatch"]
        assert rank["static_graph"] is not None and "static_graph" in rank["static_graph"]


def test_wrap_ddp_refuses_find_unused_parameters_false():
    opt = dropmuon.DropMuon(make_model())
    with pytest.raises(ValueError, match="find_unused_parameters=True"):
        dmd.wrap_ddp(make_model(), opt, find_unused_parameters=False)


# ----------------------------------------------------------------------------------------------
# Bytes per step for RELIABILITY.md: python tests/python/test_distributed.py
# ----------------------------------------------------------------------------------------------


def _measure_worker(rank, port, workdir):
    from dropmuon.compare.models import PaperCNN

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    rows = []
    steps = 40
    models = {
        "paper-cnn (MNIST, 64-128-256)": lambda: PaperCNN(1, 10, 28),
        "8-layer MLP 256 wide": lambda: nn.Sequential(
            *[m for _ in range(7) for m in (nn.Linear(256, 256), nn.ReLU())], nn.Linear(256, 10)
        ),
    }
    inputs = {
        "paper-cnn (MNIST, 64-128-256)": lambda g: torch.randn(4, 1, 28, 28, generator=g),
        "8-layer MLP 256 wide": lambda g: torch.randn(4, 256, generator=g),
    }
    for name, build in models.items():
        for sampling in ("uniform", "full"):
            for active_only in (False, True):
                torch.manual_seed(0)
                model = build()
                opt = dropmuon.DropMuon(model, lr=0.02, sampling=sampling, seed=1)
                stats = dmd.CommStats()
                ddp = dmd.wrap_ddp(model, opt, active_only=active_only, stats=stats)
                for s in range(steps):
                    g = torch.Generator().manual_seed(s * WORLD + rank)
                    opt.zero_grad()
                    ddp(inputs[name](g)).square().mean().backward()
                    opt.step()
                n_tensors = sum(1 for _ in model.parameters())
                rows.append((name, sampling, active_only, stats.bytes_per_step, n_tensors))
    if rank == 0:
        torch.save(rows, os.path.join(workdir, "bytes.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main():
    with tempfile.TemporaryDirectory() as workdir:
        spawn(_measure_worker, workdir, deadline_s=600)
        rows = torch.load(os.path.join(workdir, "bytes.pt"))
    print(f"{'model':<32} {'sampling':<8} {'mode':<12} {'bytes/step':>12} {'+ DDP used-map':>15}")
    for name, sampling, active_only, per_step, n_tensors in rows:
        mode = "active-only" if active_only else "DDP"
        print(f"{name:<32} {sampling:<8} {mode:<12} {per_step:>12,.0f} {4 * n_tensors:>15,}")


if __name__ == "__main__":
    sys.exit(main())


def test_depth_units_under_ddp_equal_one_process_and_send_only_active_units(runs):
    ranks, _ = runs
    model, opt, cutoffs = single_process(STEPS, make=make_block_model, layers="blocks")
    units = [model.stem, *model.blocks, model.head]
    sizes = [sum(p.numel() * 4 for p in unit.parameters()) for unit in units]
    assert opt.layer_names() == ["stem", "blocks.0", "blocks.1", "head"]
    assert len(set(cutoffs)) > 1
    for rank in ranks:
        blocks = rank["blocks"]
        assert blocks["names"] == opt.layer_names() and blocks["cutoffs"] == cutoffs
        assert_params_close(blocks["params"], snapshot(model))
        assert blocks["bytes"] == sum(sum(sizes[c:]) for c in cutoffs)
