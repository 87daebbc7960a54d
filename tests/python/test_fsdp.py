"""DropMuon under FSDP2 (fully_shard): 2 processes on gloo (CPU), checked against one process
on the concatenated batch.

All scenarios run in one spawn with a deadline (multiprocess.py). The model has conv
and linear layers with row counts that do not split evenly over 2 ranks (5 and 3 rows)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
import torch
from dropin import BlockNet
from multiprocess import WORLD, collect, run_scenarios
from torch import nn

import dropmuon
from dropmuon.distributed import fsdp

STEPS = 6
RESUME_AT = 3
OPTIONS = dict(lr=0.05, weight_decay=0.01, ns_precision="native", seed=3)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 5, 3)
        self.fc1 = nn.Linear(5 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


LAYERS = ("conv1", "conv2", "fc1", "fc2")


def make_model():
    torch.manual_seed(0)
    return Net()


def global_batch(step):
    g = torch.Generator().manual_seed(700 + step)
    return torch.randn(6 * WORLD, 1, 8, 8, generator=g), torch.randint(
        0, 3, (6 * WORLD,), generator=g
    )


def rank_batch(step, rank):
    x, y = global_batch(step)
    return x[6 * rank : 6 * rank + 6], y[6 * rank : 6 * rank + 6]


def loss_of(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


# ----------------------------------------------------------------------------------------------
# The workers
# ----------------------------------------------------------------------------------------------


def make_block_model():
    torch.manual_seed(0)
    return BlockNet(64, 16, 13, 3)  # 13 hidden rows in FSDP2: an uneven split


def sharded_block_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = make_block_model()
    for module in (model.stem, *model.blocks, model.head):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sharded_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for name in LAYERS:
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_copy(model):
    return {n: p.to_local().detach().clone() for n, p in model.named_parameters()}


def gathered(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def train_sharded(model, opt, rank, steps, start=0, watch=None):
    """Trains; with ``watch`` (a dict), records per step the cutoff, which layers' local shards
    changed, and the bytes each kind of collective sent."""
    for s in range(start, start + steps):
        before = local_copy(model)
        cutoff = opt.cutoff
        opt.zero_grad()
        counter = fsdp.CollectiveCounter(WORLD)
        with counter:
            loss_of(model, rank_batch(s, rank)).backward()
            backward_sent = dict(counter.sent)
            backward_calls = dict(counter.calls)
            opt.step()
        if watch is not None:
            after = local_copy(model)
            changed = {n: not torch.equal(before[n], after[n]) for n in before}
            watch.setdefault("steps", []).append(
                dict(
                    cutoff=cutoff,
                    changed=changed,
                    backward_sent=backward_sent,
                    backward_calls=backward_calls,
                    step_sent={k: v - backward_sent.get(k, 0) for k, v in counter.sent.items()},
                )
            )


def _error_of(build):
    try:
        build()
    except ValueError as error:
        return str(error)
    return None


def _unsupported(rank, mesh):
    """The clear errors, and that a refused construction changed nothing."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    mixed = make_model()
    fully_shard(mixed.conv1, mesh=mesh)  # the rest stays plain
    out["mixed"] = _error_of(lambda: dropmuon.DropMuon(mixed))
    out["mixed_requires_grad"] = all(p.requires_grad for p in mixed.parameters())

    hsdp = make_model()
    mesh_2d = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    fully_shard(hsdp, mesh=mesh_2d)
    out["hsdp"] = _error_of(lambda: dropmuon.DropMuon(hsdp))

    for name, placement in (("tensor_parallel", Shard(1)), ("replicated", Replicate())):
        layer = nn.Linear(8, 6)
        layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [placement]))
        layer.bias = nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Shard(0)]))
        out[name] = _error_of(lambda layer=layer: dropmuon.DropMuon(layer))

    out["cost_optimal"] = _error_of(
        lambda: dropmuon.DropMuon(sharded_model(mesh), sampling="cost_optimal")
    )
    early = make_model()
    opt = dropmuon.DropMuon(early)  # built before sharding: it holds the replaced tensors
    for name in LAYERS:
        fully_shard(getattr(early, name), mesh=mesh)
    fully_shard(early, mesh=mesh)
    loss_of(early, rank_batch(0, rank)).backward()
    try:
        opt.step()
        out["built_before_sharding"] = None
    except RuntimeError as error:
        out["built_before_sharding"] = str(error)
    out["mode"] = _error_of(lambda: dropmuon.DropMuon(make_model(), fsdp_update="scatter"))
    return out


def _scenarios(rank, workdir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}

    # Uniform DropMuon, owner-computes, watched step by step; and Muon for the byte counts.
    for name, options in (
        ("uniform", dict(sampling="uniform", fallback="sign")),
        ("all_gather", dict(sampling="uniform", fsdp_update="all_gather", fallback="sign")),
        ("muon", dict(sampling="full", fallback="sign")),
        ("adamw_adaptive", dict(fallback="adamw", radius="adaptive", L0=2.0)),
    ):
        model = sharded_model(mesh)
        opt = dropmuon.DropMuon(model, **OPTIONS, **options)
        watch = {}
        train_sharded(model, opt, rank, STEPS, watch=watch)
        state_bytes = sum(
            t.to_local().numel() * t.element_size()
            for s in opt.state.values()
            for t in s.values()
            if isinstance(t, torch.distributed.tensor.DTensor)
        )
        placements = {
            str(t.placements) for s in opt.state.values() for t in s.values() if t.dim() > 0
        }
        out[name] = dict(
            params=gathered(model), watch=watch, state_bytes=state_bytes, placements=placements
        )

    # Depth units (layers="blocks"), each block sharded as a unit.
    model = sharded_block_model(mesh)
    opt = dropmuon.DropMuon(model, **OPTIONS, layers="blocks", fallback="adamw")
    watch = {}
    train_sharded(model, opt, rank, STEPS, watch=watch)
    out["blocks"] = dict(params=gathered(model), watch=watch, names=opt.layer_names())

    # DCP resume: save at RESUME_AT, go on; a fresh model and optimizer load and go on.
    for name, by_groups in (("resume", False), ("resume_param_groups", True)):
        path = os.path.join(workdir, f"dcp_{name}")

        def build(by_groups=by_groups):
            model = sharded_model(mesh)
            if by_groups:
                groups = [
                    {"params": list(getattr(model, n).parameters()), "layer": i}
                    for i, n in enumerate(LAYERS)
                ]
                return model, dropmuon.DropMuon(groups, **OPTIONS, fallback="adamw")
            return model, dropmuon.DropMuon(model, **OPTIONS, fallback="adamw")

        model, opt = build()
        train_sharded(model, opt, rank, RESUME_AT)
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, opt),
        }
        dcp.save(state, checkpoint_id=path)
        train_sharded(model, opt, rank, STEPS - RESUME_AT, start=RESUME_AT)
        straight = gathered(model)
        straight_state = opt.state_dict()

        model, opt = build()
        with torch.no_grad():  # all of it must come from the checkpoint
            for p in model.parameters():
                p.add_(1.0)
        frozen_at_load = [n for n, p in model.named_parameters() if not p.requires_grad]
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, opt),
        }
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        loaded_step = opt.step_count
        train_sharded(model, opt, rank, STEPS - RESUME_AT, start=RESUME_AT)
        resumed_state = opt.state_dict()
        out[name] = dict(
            straight=straight,
            resumed=gathered(model),
            loaded_step=loaded_step,
            frozen_at_load=frozen_at_load,
            same_state=all(
                torch.equal(a.to_local(), b.to_local()) if a.dim() > 0 else torch.equal(a, b)
                for key in straight_state["state"]
                for a, b in zip(
                    straight_state["state"][key].values(), resumed_state["state"][key].values()
                )
            ),
            sections=(
                straight_state["param_groups"][0]["dropmuon"],
                resumed_state["param_groups"][0]["dropmuon"],
            ),
        )

    # A NaN in one rank's shard only: every rank skips the same layer (or raises).
    for mode in ("skip", "raise"):
        model = sharded_model(mesh)
        opt = dropmuon.DropMuon(model, **OPTIONS, sampling="full", nonfinite=mode)
        loss_of(model, rank_batch(0, rank)).backward()
        if rank == 1:
            model.fc1.weight.grad.to_local()[0, 0] = float("nan")
        before = local_copy(model)
        try:
            opt.step()
            error = None
        except RuntimeError as e:
            error = str(e)
        after = local_copy(model)
        out[f"nonfinite_{mode}"] = dict(
            error=error,
            skipped=list(opt.skipped_nonfinite),
            changed={n: not torch.equal(before[n], after[n]) for n in before},
        )

    out["errors"] = _unsupported(rank, mesh)
    return out


def _worker(rank, port, workdir):
    run_scenarios(rank, port, workdir, _scenarios)


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as workdir:
        return collect(_worker, workdir)


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------


def single_process(steps, make=make_model, **options):
    """The reference: one process, the unsharded model, the concatenated batch."""
    model = make()
    opt = dropmuon.DropMuon(model, **OPTIONS, **options)
    cutoffs = []
    for s in range(steps):
        cutoffs.append(opt.cutoff)
        opt.zero_grad()
        loss_of(model, global_batch(s)).backward()
        opt.step()
    return dict(model.named_parameters()), cutoffs


# FSDP2 averages the two ranks' gradients with a reduce-scatter (each rank's mean over its 6
# samples, summed and halved), one process takes the mean over 12: the gradients differ by
# float32 rounding (~1e-7 relative), which Newton-Schulz and 6 steps carry to ~1e-6.
TOLERANCE = 1e-5


@pytest.mark.parametrize(
    "name, options",
    [
        ("uniform", dict(sampling="uniform", fallback="sign")),
        ("all_gather", dict(sampling="uniform", fallback="sign")),
        ("muon", dict(sampling="full", fallback="sign")),
        ("adamw_adaptive", dict(fallback="adamw", radius="adaptive", L0=2.0)),
    ],
)
def test_sharded_run_equals_one_process_on_the_concatenated_batch(runs, name, options):
    reference, cutoffs = single_process(STEPS, **options)
    start = dict(make_model().named_parameters())
    for rank in runs:
        assert [s["cutoff"] for s in rank[name]["watch"]["steps"]] == cutoffs
        for n, p in reference.items():
            torch.testing.assert_close(
                rank[name]["params"][n], p.detach(), rtol=TOLERANCE, atol=TOLERANCE
            )
            assert not torch.equal(p.detach(), start[n].detach())  # it trained
    if name == "uniform":
        assert len(set(cutoffs)) > 1


def test_owner_computes_equals_the_all_gather_baseline(runs):
    for rank in runs:
        for n, p in rank["uniform"]["params"].items():
            assert torch.equal(p, rank["all_gather"]["params"][n]), n


def test_frozen_layers_are_unchanged_and_communicate_nothing(runs):
    sizes = {n: p.numel() * 4 for n, p in make_model().named_parameters()}
    for rank in runs:
        for name in ("uniform", "muon"):
            for step in rank[name]["watch"]["steps"]:
                active = {LAYERS[i] for i in range(step["cutoff"], len(LAYERS))}
                for param, changed in step["changed"].items():
                    assert changed == (param.split(".")[0] in active), (name, step["cutoff"], param)
                # One reduce-scatter per active layer, none for the frozen ones; its payload
                # is the layer's gradients padded to equal shards (FSDP2's layout).
                assert step["backward_calls"].get("reduce_scatter", 0) == len(active)
                padded = sum(
                    WORLD * -(-p.shape[0] // WORLD) * (p.numel() // p.shape[0]) * 4
                    for n, p in make_model().named_parameters()
                    if n.split(".")[0] in active
                )
                assert step["backward_sent"]["reduce_scatter"] == padded * (WORLD - 1) / WORLD
                # The owner exchange sends at most the active matrices, twice.
                whole = sum(sizes[n] for n in sizes if n.split(".")[0] in active and "weight" in n)
                assert 0 < step["step_sent"]["all_to_all"] <= 2 * whole
        uniform = [s["backward_sent"]["reduce_scatter"] for s in rank["uniform"]["watch"]["steps"]]
        muon = [s["backward_sent"]["reduce_scatter"] for s in rank["muon"]["watch"]["steps"]]
        assert sum(uniform) < sum(muon)


def test_optimizer_state_is_sharded(runs):
    unsharded = sum(p.numel() * 4 for p in make_model().parameters())  # one momentum each
    for rank in runs:
        assert rank["uniform"]["placements"] == {"(Shard(dim=0),)"}
        assert rank["uniform"]["state_bytes"] <= unsharded / WORLD + 4 * 16 * 5  # uneven rows
        assert rank["uniform"]["state_bytes"] < unsharded
    total = sum(rank["uniform"]["state_bytes"] for rank in runs)
    assert total == unsharded


@pytest.mark.parametrize("name", ["resume", "resume_param_groups"])
def test_dcp_resume_equals_the_uninterrupted_run_bit_for_bit(runs, name):
    for rank in runs:
        run = rank[name]
        assert run["loaded_step"] == RESUME_AT
        for n, p in run["straight"].items():
            assert torch.equal(p, run["resumed"][n]), n
        assert run["same_state"]
        straight, resumed = run["sections"]
        orders = (straight.pop("layer_order"), resumed.pop("layer_order"))
        if name == "resume":  # the resumed run took its layer order from the file
            assert orders == ("first forward", "checkpoint")
        else:
            assert orders == ("param groups", "param groups")
        assert straight == resumed
    # Nothing is frozen between forward passes, so set_optimizer_state_dict keeps every
    # parameter's state (0.1 froze layers between steps and lost theirs there).
    assert not runs[0][name]["frozen_at_load"]


def test_a_nan_on_one_rank_is_agreed_by_every_rank(runs):
    for rank in runs:
        skip = rank["nonfinite_skip"]
        assert skip["error"] is None and skip["skipped"] == [0, 0, 1, 0]
        assert skip["changed"] == {n: not n.startswith("fc1") for n in skip["changed"]}
        stop = rank["nonfinite_raise"]
        assert "non-finite gradient in parameter 'fc1.weight'" in stop["error"]
        assert not any(stop["changed"].values())


def test_unsupported_setups_fail_clearly_at_construction(runs):
    for rank in runs:
        errors = rank["errors"]
        assert "'conv2.weight' is a plain tensor" in errors["mixed"]
        assert "apply fully_shard to the root module" in errors["mixed"]
        assert errors["mixed_requires_grad"]  # nothing changed
        assert "2-D device mesh" in errors["hsdp"] and "(Shard(0),)" in errors["hsdp"]
        assert "placements (Shard(dim=1),)" in errors["tensor_parallel"]
        assert "'weight'" in errors["tensor_parallel"]
        assert "placements (Replicate(),)" in errors["replicated"]
        assert "not supported with FSDP2" in errors["cost_optimal"]
        assert "fsdp_update must be one of" in errors["mode"]
        assert "'conv1.weight' is not the tensor this optimizer was built on" in (
            errors["built_before_sharding"] or ""
        )


def test_owner_assignment_balances_and_is_deterministic():
    costs = [9.0, 1.0, 4.0, 4.0, 1.0, 1.0]
    owners = fsdp.assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert owners == fsdp.assign_owners(costs, 2)
    assert sorted(loads) == [10.0, 10.0]
    assert fsdp.assign_owners([1.0, 1.0, 1.0], 4) == [0, 1, 2]


def test_row_ranges_split_like_fully_shard():
    for rows in (0, 1, 3, 5, 8):
        for world in (1, 2, 3):
            parts = torch.arange(rows).chunk(world)
            for rank in range(world):
                start, end = fsdp.row_range(rows, world, rank)
                expected = parts[rank].tolist() if rank < len(parts) else []
                assert list(range(start, end)) == expected


def test_the_fsdp2_example_resumes_bit_for_bit():
    example = pathlib.Path(__file__).parents[2] / "examples" / "fsdp2.py"
    run = subprocess.run(
        [sys.executable, str(example), "--steps", "6", "--dataset", "synthetic"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[:3000] + "\n...\n" + run.stderr[-3000:]
    assert "resumed run equals the uninterrupted one bit for bit: True" in run.stdout


def test_depth_units_under_fsdp2_equal_one_process(runs):
    """layers="blocks" on a model whose blocks are sharded one by one: the units are found and
    ordered at the first forward (placed by the calls of their sharded modules), and the run
    equals one process on the concatenated batch; units below the cutoff do not change."""
    reference, cutoffs = single_process(
        STEPS, make=make_block_model, layers="blocks", fallback="adamw"
    )
    assert len(set(cutoffs)) > 1
    units = ["stem", "blocks.0", "blocks.1", "head"]
    for rank in runs:
        blocks = rank["blocks"]
        assert blocks["names"] == units
        assert [s["cutoff"] for s in blocks["watch"]["steps"]] == cutoffs
        for n, p in reference.items():
            torch.testing.assert_close(
                blocks["params"][n], p.detach(), rtol=TOLERANCE, atol=TOLERANCE
            )
        for step in blocks["watch"]["steps"]:
            for n, changed in step["changed"].items():
                unit = next(i for i, u in enumerate(units) if n.startswith(u + "."))
                assert changed == (unit >= step["cutoff"]), (n, step["cutoff"])
