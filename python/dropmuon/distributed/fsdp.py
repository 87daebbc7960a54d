"""FSDP2 (``torch.distributed.fsdp.fully_shard``): DropMuon on sharded parameters.

Build the optimizer after sharding, on the sharded model, as with any torch optimizer::

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)                                   # the root too: every parameter sharded
    opt = dropmuon.DropMuon(model, lr=0.02, seed=0)      # the same seed on every rank
    for x, y in loader:                                  # each rank its part of the batch
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

**Supported**: every managed parameter a DTensor on one 1-D device mesh, placed
``(Shard(0),)``, which is what ``fully_shard`` makes on a 1-D mesh (row counts that do not
divide evenly included). Refused at construction with a ValueError naming the parameter,
before anything changes: 2-D meshes (HSDP, FSDP with tensor parallel), other placements
(tensor parallel, a ``shard_placement_fn`` other than dim 0), parameters on different meshes,
a mix of DTensor and plain parameters (shard the root module too), and ``cost_optimal`` /
``estimate_smoothness`` (their estimates need whole gradients every step).

**A step**, on every rank:

1. Truncation works as without sharding: while the forward runs, the layers below the cutoff
   have ``requires_grad=False`` on their sharded parameters, which fully_shard copies to the
   unsharded ones as it gathers them, so their backward, their gradient reduce-scatter and
   their backward all-gather do not run (bytes counted in tests/python/test_fsdp.py and
   benchmarks/bench_fsdp.py with :class:`CollectiveCounter`).
2. NaN/Inf gradients are found on the local shards and the verdict is agreed with one small
   all-reduce, so every rank raises on (or skips) the same layers.
3. Elementwise updates run on the local shards, without communication: AdamW, and the
   ``sign`` norm with the fixed radius (momentum, sign(D) and the parameter step are all per
   element).
4. Every other norm needs whole matrices (Newton-Schulz; column, row and Frobenius norms; the
   adaptive radius' dual norm). Each rank updates its momentum shard and forms its rows of the
   direction D. Each active matrix gets one owner rank: largest Newton-Schulz cost first, to
   the least loaded rank, decided from the shapes alone, so the same on every rank without
   communication. One all-to-all per dtype sends the rows of D to their owners; the owner runs
   the same kernels as without sharding and scales sharp(D) by the step size; a second
   all-to-all sends each rank its rows of the update. ``fsdp_update="all_gather"`` is the
   simple baseline: every rank all-gathers every direction and computes every update. Frozen
   layers take part in neither.

**Optimizer state** is sharded like the parameters: momentum buffers and AdamW moments are
DTensors with their parameter's placement (per rank ~1/world_size of the unsharded state),
made at construction like every DropMuon's state (see :meth:`DropMuon.state_dict`).

**Checkpoints** go through ``torch.distributed.checkpoint``: ``get_optimizer_state_dict`` /
``set_optimizer_state_dict`` with ``dcp.save`` / ``dcp.load`` keep DropMuon's own state,
which :meth:`DropMuon.state_dict` carries in the first param group (torch's converters keep
``state`` and ``param_groups`` only). ``set_optimizer_state_dict`` leaves out the state of
parameters that do not require grad (frozen by the user); ``dcp.load`` has already loaded their
tensors in place, so :meth:`DropMuon.load_state_dict` keeps them (see there).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from ..dtensors import is_dtensor, local_tensor
from ..kernels import ops
from ..step.update import Bucket, momentum_buffer, update_bucket_
from ..update_rules import UpdateArguments, direction, matrix_shape, step_size

if TYPE_CHECKING:  # the optimizer's layers: their parameters and names
    from ..layers.book import LayerBook

UPDATE_MODES = ("owner", "all_gather")
SUPPORTED = (
    "DropMuon supports DTensor parameters as fully_shard makes them on a 1-D device mesh "
    "(placements (Shard(0),)), with every managed parameter sharded on the same mesh"
)
# Norms whose update is elementwise (with the fixed radius): computed on the local shards.
LOCAL_NORMS = ("sign",)


def row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The rows [start, end) that ``rank`` holds of a tensor sharded on dim 0, as
    fully_shard (torch.chunk) splits them: ceil(rows / world) per rank, the last ones shorter
    or empty."""
    per_rank = -(-rows // world)
    start = min(rank * per_rank, rows)
    return start, min(start + per_rank, rows)


class ShardedUpdate:
    """The sharded half of a DropMuon step (module docstring): checks at construction, the
    agreed NaN/Inf verdict, and the update of the active buckets."""

    def __init__(self, layers: LayerBook, mode: str) -> None:
        params, param_name = list(layers.params()), layers.name
        sharded = [p for p in params if is_dtensor(p)]
        mesh = sharded[0].device_mesh
        for p in params:
            _check_placement(p, param_name(p), mesh, param_name(sharded[0]))
        self.mode = mode
        self.device = sharded[0].device  # the collectives' buffers live there (NCCL: CUDA)
        self.group = mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        for p in sharded:
            start, end = row_range(p.shape[0], self.world, self.rank)
            if tuple(p.to_local().shape) != (end - start, *p.shape[1:]):
                raise ValueError(
                    f"DTensor parameter '{param_name(p)}' holds {tuple(p.to_local().shape)} "
                    f"on rank {self.rank}, not rows {start}:{end} of {tuple(p.shape)} as "
                    f"fully_shard splits them; {SUPPORTED}"
                )

    def rows_numel(self, p: Tensor, rank: int) -> int:
        """How many elements of ``p`` rank ``rank`` holds."""
        start, end = row_range(p.shape[0], self.world, rank)
        return (end - start) * (p.numel() // p.shape[0])

    def rows_of(self, flat: Tensor, p: Tensor, rank: int) -> Tensor:
        """Rank ``rank``'s rows of ``flat``, a whole tensor of ``p``'s shape, flattened."""
        start, end = row_range(p.shape[0], self.world, rank)
        cols = p.numel() // p.shape[0]
        return flat[start * cols : end * cols]

    def any_rank(self, flags: list[bool]) -> list[bool]:
        """Each flag set where any rank set it (one all-reduce)."""
        agreed = torch.tensor(flags, dtype=torch.int32, device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(f) for f in agreed.tolist()]

    def update_(self, buckets: list[Bucket], state, cuda_kernels: bool | None = None) -> None:
        """Updates the active buckets' parameters in place from their (sharded) gradients."""
        whole = []
        for bucket in buckets:
            elementwise = bucket.norm == "adamw" or (
                bucket.norm in LOCAL_NORMS and bucket.arguments.radius == "fixed"
            )
            if elementwise:  # the unsharded update, on the local shards
                update_bucket_(bucket, state, cuda_kernels)
            else:
                whole.append(bucket)
        if whole:
            self._update_whole_matrices_(whole, state, cuda_kernels)

    # -- the whole-matrix norms -----------------------------------------------------------------

    def _update_whole_matrices_(self, buckets: list[Bucket], state, cuda_kernels) -> None:
        # The same entries on every rank, in the same order; zero-size tensors have nothing to do.
        entries = [(b, p) for b in buckets for p in b.params if p.numel() > 0]
        directions = [_momentum_direction_(b.arguments, p, state[p]) for b, p in entries]
        params = [p for _, p in entries]
        if self.mode == "owner":
            owners = assign_owners([update_cost(b, p) for b, p in entries], self.world)
            full = self._gather_to_owners(params, directions, owners)
        else:
            owners = None
            full = self._all_gather(params, directions)
        updates = _scaled_updates(entries, full, cuda_kernels)
        if owners is None:
            mine = {i: self.rows_of(u, params[i], self.rank) for i, u in updates.items()}
        else:
            mine = self._scatter_from_owners(params, updates, owners)
        for i, (bucket, p) in enumerate(entries):
            arguments = bucket.arguments
            x = local_tensor(p)
            x.mul_(1 - arguments.lr * arguments.weight_decay)
            x.sub_(mine[i].view_as(x))

    def _gather_to_owners(self, params, directions, owners) -> dict[int, Tensor]:
        """{i: the whole direction i (flat)} for the matrices this rank owns: one all-to-all
        per dtype, each rank sending every owner its rows."""
        full: dict[int, Tensor] = {}
        for indices in _by_dtype(params):
            sent = [[i for i in indices if owners[i] == q] for q in range(self.world)]
            mine = sent[self.rank]
            pieces = [directions[i].reshape(-1) for q in range(self.world) for i in sent[q]]
            in_splits = [sum(directions[i].numel() for i in sent[q]) for q in range(self.world)]
            out_splits = [
                sum(self.rows_numel(params[i], s) for i in mine) for s in range(self.world)
            ]
            received = self._all_to_all(pieces, in_splits, out_splits, params[indices[0]].dtype)
            by_source = [
                chunk.split([self.rows_numel(params[i], s) for i in mine])
                for s, chunk in enumerate(received.split(out_splits))
            ]
            for k, i in enumerate(mine):
                full[i] = torch.cat([by_source[s][k] for s in range(self.world)])
        return full

    def _scatter_from_owners(self, params, updates, owners) -> dict[int, Tensor]:
        """{i: this rank's rows of update i (flat)} for every matrix: the owners' all-to-all
        back."""
        mine: dict[int, Tensor] = {}
        for indices in _by_dtype(params):
            owned = [i for i in indices if owners[i] == self.rank]
            received_from = [[i for i in indices if owners[i] == s] for s in range(self.world)]
            pieces = []
            for q in range(self.world):
                pieces.extend(self.rows_of(updates[i], params[i], q) for i in owned)
            in_splits = [
                sum(self.rows_numel(params[i], q) for i in owned) for q in range(self.world)
            ]
            out_splits = [
                sum(self.rows_numel(params[i], self.rank) for i in received_from[s])
                for s in range(self.world)
            ]
            received = self._all_to_all(pieces, in_splits, out_splits, params[indices[0]].dtype)
            for s, chunk in enumerate(received.split(out_splits)):
                sizes = [self.rows_numel(params[i], self.rank) for i in received_from[s]]
                for i, piece in zip(received_from[s], chunk.split(sizes)):
                    mine[i] = piece
        return mine

    def _all_gather(self, params, directions) -> dict[int, Tensor]:
        """{i: the whole direction i (flat)} for every matrix: one all-gather per dtype (the
        baseline mode)."""
        full: dict[int, Tensor] = {}
        for indices in _by_dtype(params):
            sizes = [[self.rows_numel(params[i], s) for i in indices] for s in range(self.world)]
            longest = max(sum(row) for row in sizes)
            packed = torch.zeros(longest, dtype=params[indices[0]].dtype, device=self.device)
            mine = torch.cat([directions[i].reshape(-1) for i in indices])
            packed[: mine.numel()] = mine
            gathered = torch.empty(self.world * longest, dtype=packed.dtype, device=self.device)
            dist.all_gather_into_tensor(gathered, packed, group=self.group)
            by_source = [
                gathered[s * longest : s * longest + sum(sizes[s])].split(sizes[s])
                for s in range(self.world)
            ]
            for k, i in enumerate(indices):
                full[i] = torch.cat([by_source[s][k] for s in range(self.world)])
        return full

    def _all_to_all(self, pieces, in_splits, out_splits, dtype) -> Tensor:
        send = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype, device=self.device)
        received = torch.empty(sum(out_splits), dtype=dtype, device=self.device)
        dist.all_to_all_single(received, send, out_splits, in_splits, group=self.group)
        return received


def _check_placement(p: Tensor, name: str, mesh, first_name: str) -> None:
    if not is_dtensor(p):
        raise ValueError(
            f"parameter '{name}' is a plain tensor, while '{first_name}' is a DTensor: "
            f"{SUPPORTED}; apply fully_shard to the root module too (after its submodules)"
        )
    if p.dim() == 0:
        raise ValueError(f"DTensor parameter '{name}' is 0-D: {SUPPORTED}")
    if p.device_mesh.ndim != 1:
        raise ValueError(
            f"DTensor parameter '{name}' is on a {p.device_mesh.ndim}-D device mesh "
            f"(HSDP or tensor parallel): {SUPPORTED}"
        )
    if tuple(p.placements) != (torch.distributed.tensor.Shard(0),):
        raise ValueError(
            f"DTensor parameter '{name}' has placements {tuple(p.placements)} (tensor parallel "
            f"or a shard_placement_fn other than dim 0): {SUPPORTED}"
        )
    if p.device_mesh != mesh:
        raise ValueError(
            f"DTensor parameter '{name}' is on another device mesh than '{first_name}': {SUPPORTED}"
        )


def sharded_update(layers: LayerBook, mode: str, estimate_smoothness: bool):
    """A :class:`ShardedUpdate` when the optimizer's parameters (``layers``: its
    :class:`~dropmuon.layers.book.LayerBook`) are DTensors (checked), else None."""
    if mode not in UPDATE_MODES:
        raise ValueError(f"fsdp_update must be one of {UPDATE_MODES}, got {mode!r}")
    if not any(is_dtensor(p) for p in layers.params()):
        return None
    if estimate_smoothness:
        raise ValueError(
            "sampling='cost_optimal' and estimate_smoothness are not supported with "
            "FSDP2-sharded parameters: the estimates need whole gradients every step"
        )
    return ShardedUpdate(layers, mode)


def update_cost(bucket: Bucket, p: Tensor) -> float:
    """The owner's work for one matrix: Newton-Schulz FLOPs (docs/method.md section 4) for the
    spectral norm, one pass over the elements otherwise."""
    rows, cols = matrix_shape(p.shape)
    if bucket.norm != "spectral":
        return float(rows * cols)
    m, n = min(rows, cols), max(rows, cols)
    return float(bucket.arguments.schedule.steps * (4 * m * m * n + 2 * m**3) + rows * cols)


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """The owner rank of each matrix: largest cost first, each to the least loaded rank (the
    lowest on ties); a function of the costs alone, so every rank computes the same."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def _by_dtype(params) -> list[list[int]]:
    """Indices of ``params`` by dtype, in first-appearance order (the same on every rank)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    return list(groups.values())


def _momentum_direction_(arguments: UpdateArguments, p: Tensor, param_state: dict) -> Tensor:
    """Updates the local momentum shard and returns the local rows of the direction D, with
    the fused kernel's arithmetic (reference.muon_update_)."""
    grad = local_tensor(p.grad)
    buf = local_tensor(momentum_buffer(param_state, p))
    buf.lerp_(grad, 1 - arguments.momentum)
    d = direction(grad, buf, arguments.momentum, arguments.nesterov)
    return d.clone() if d is buf else d


def _scaled_updates(entries, full: dict[int, Tensor], cuda_kernels) -> dict[int, Tensor]:
    """{i: step_i * sharp(D_i)} for the whole directions at hand, one sharp call per bucket."""
    updates: dict[int, Tensor] = {}
    index_of = defaultdict(list)
    for i, (bucket, _) in enumerate(entries):
        if i in full:
            index_of[id(bucket)].append(i)
    for indices in index_of.values():
        bucket, p = entries[indices[0]]
        a = bucket.arguments
        rows, cols = matrix_shape(p.shape)
        batch = torch.stack([full[i].view(rows, cols) for i in indices])
        adaptive = a.radius == "adaptive"
        out, duals = ops.sharp(
            batch,
            a.norm,
            ns_coefficients=a.schedule,  # resolved: ns_steps is not read
            eps=a.eps,
            ns_precision=a.ns_precision,
            with_duals=adaptive,
            cuda_kernels=cuda_kernels,
        )
        for k, i in enumerate(indices):
            dual = float(duals[k]) if adaptive else None
            step = step_size(a.lr, a.adjust_lr_fn, rows, cols, a.radius, dual, a.L0, a.L1)
            updates[i] = out[k].mul_(step).reshape(-1)
    return updates


# ----------------------------------------------------------------------------------------------
# Counting communication
# ----------------------------------------------------------------------------------------------

# What one rank sends to the others in a bandwidth-optimal algorithm, from the tensor it passes
# (the collective's input): all-gather (W-1) x input, reduce-scatter (W-1)/W x input, all-reduce
# 2 (W-1)/W x input, all-to-all the input less the part addressed to itself.
_COLLECTIVES = {
    "_allgather_base_": ("all_gather", 1),
    "allgather_into_tensor_coalesced_": ("all_gather", 1),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "allreduce_": ("all_reduce", 0),
    "alltoall_base_": ("all_to_all", 1),
    "broadcast_": ("broadcast", 0),
}


def _tensor_bytes(value) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class CollectiveCounter(TorchDispatchMode):
    """Counts, while active, the bytes this rank sends in torch.distributed collectives (its
    own and fully_shard's), by kind: ``sent["reduce_scatter"]`` etc. and ``calls[kind]``.
    Bytes are what one rank sends to the others in a bandwidth-optimal algorithm (see
    ``_COLLECTIVES``); a collective of another kind is counted under its operator's name::

        with CollectiveCounter(world_size) as counter:
            loss_fn(model(x), y).backward(); opt.step()
        counter.sent["reduce_scatter"]
    """

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world
        self.sent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            self._count(func, args)
        return func(*args, **kwargs)

    def _count(self, func, args) -> None:
        name = func._schema.name.split("::")[-1]
        kind, input_at = _COLLECTIVES.get(name, (name, 0))
        size = _tensor_bytes(args[input_at]) if len(args) > input_at else 0
        w = self.world
        if kind == "all_gather":
            size *= w - 1
        elif kind == "reduce_scatter":
            size = size * (w - 1) / w
        elif kind == "all_reduce":
            size = 2 * size * (w - 1) / w
        elif kind == "all_to_all":
            size -= self._self_part(args)
        elif kind == "broadcast":
            size = size * (w - 1) if dist.get_rank() == _broadcast_root(args) else 0
        self.sent[kind] += size
        self.calls[kind] += 1

    def _self_part(self, args) -> int:
        send, splits = args[1], args[4]  # alltoall_base_(out, in, group, out_splits, in_splits)
        if not splits:
            return send.numel() * send.element_size() // self.world
        rank = dist.get_rank()
        return splits[rank] * (send.numel() // max(1, sum(splits))) * send.element_size()

    def reset(self) -> None:
        self.sent.clear()
        self.calls.clear()


def _broadcast_root(args) -> int:
    return int(args[2]) if len(args) > 2 else 0  # broadcast_(tensors, group, root, ...)


def release_device_meshes() -> None:
    """Drops what torch's DTensor caches hold of the device meshes, so that
    ``destroy_process_group()`` can free the process groups. Call it after training and before
    ``destroy_process_group()`` in every process that used FSDP2 (or any DTensor).

    Why: DTensor caches its sharding decisions and redistribution plans (module-level
    ``lru_cache`` functions, the sharding propagator's own caches, the C++ fast path's cache), and
    their keys and values keep the DeviceMesh, hence the process group, alive after
    ``destroy_process_group()``. A gloo group's worker threads then outlive it into
    interpreter shutdown, and a worker that drops its last reference to a Python-owned tensor
    there (the work a barrier waited for, released just after it) needs the GIL of a
    finalizing interpreter: the process aborts with "terminate called without an active
    exception". With the caches cleared, the group is freed and its threads are joined inside
    ``destroy_process_group()``. Each cache is cleared if this torch has it. Then the garbage
    is collected: a sharded model that is gone may still sit in reference cycles, holding its
    DTensors, until the collector runs."""
    import functools
    import gc
    import sys

    from torch.distributed.tensor import DTensor

    for name, module in list(sys.modules.items()):
        if name.startswith("torch.distributed.tensor") and module is not None:
            for value in list(vars(module).values()):
                if isinstance(value, functools._lru_cache_wrapper):
                    value.cache_clear()
    propagator = DTensor._op_dispatcher.sharding_propagator
    for cache in (
        getattr(propagator, "propagate_op_sharding", None),
        getattr(propagator, "_propagate_tensor_meta_cached", None),
    ):
        if hasattr(cache, "cache_clear"):
            cache.cache_clear()
    clear_fast_path = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_fast_path is not None:
        clear_fast_path()
    from torch.distributed.tensor import _redistribute

    if hasattr(_redistribute, "clear_redistribute_planner_cache"):
        _redistribute.clear_redistribute_planner_cache()
    gc.collect()  # what the caches kept alive may sit in reference cycles
