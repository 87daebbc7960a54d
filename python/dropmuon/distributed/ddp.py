"""Data-parallel training with DropMuon.

Every rank draws the same layers at the same step without communicating: the sampler is a pure
function of ``(seed, step)`` (:mod:`dropmuon.layers.sampling`). Replicas therefore stay equal as
long as they start equal, share the seed and the step counter, and see the same averaged gradients.
Two ways to average them:

**torch DDP**, through :func:`wrap_ddp` (``torch.nn.parallel.DistributedDataParallel`` with the
settings DropMuon needs)::

    model = Net()
    opt = dropmuon.DropMuon(model, lr=0.02, seed=0)        # the same seed on every rank
    ddp = dropmuon.distributed.wrap_ddp(model, opt)        # active_only=True by default
    for x, y in loader:                                    # each rank its shard
        opt.zero_grad(); loss_fn(ddp(x), y).backward(); opt.step()

What plain DDP needs, measured with torch 2.13 on layers frozen per step:

- ``find_unused_parameters=True``. A frozen layer's parameters get no gradient; without it DDP
  waits for them and fails at the next forward ("Expected to have finished reduction in the
  prior iteration"). With it, DDP marks them unused on every rank and leaves their ``.grad``
  None, so the frozen layers are not touched. It costs a graph traversal per iteration and a
  small all-reduce of one int per parameter tensor.
- not ``static_graph=True``: the set of parameters with gradients changes every step, which
  static graph forbids ("Your training graph has changed in this iteration"; one of our runs
  aborted the process instead).
- every managed parameter must require grad while DDP is constructed: DDP registers only those,
  and a parameter frozen at that moment is silently never averaged later (the replicas diverge).
  DropMuon freezes layers only while a forward pass runs, so any time between forward passes
  is fine.

Plain DDP still all-reduces every bucket, frozen layers' zeros included. With ``active_only``
(the default), :func:`wrap_ddp` registers a communication hook that all-reduces only the
gradients of the parameters the coming step updates (``optimizer.is_active(p)``), i.e. the
active layers: a bucket of frozen layers costs no communication, and a partly active bucket
sends only its active part. The hook keeps DDP's overlap of communication with the backward
pass.

**Without DDP**, :func:`all_reduce_gradients` after the backward pass averages the active
layers' gradients in one all-reduce per dtype (no overlap, but no DDP constraints); start with
:func:`broadcast_parameters` so that the replicas are equal.

**Checkpoints** do not depend on the world size: the optimizer state is a full replica, equal on
every rank, and the step counter counts optimizer steps, not samples. Save on one rank and load
on every rank of any world size; what changes with the world size is the global batch, which is
the training script's business (like the epoch length that ``epoch_shift``'s ``total_steps``
assumes). :func:`check_replicas` (which :func:`wrap_ddp` calls) fails clearly when the ranks
disagree on the step, seed, layer count or active layers, e.g. when only some loaded a
checkpoint.
"""

import weakref
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layers.sampling import LayerSampler


@dataclass
class CommStats:
    """Gradient bytes this rank all-reduced (payload only, as each collective's input size)."""

    bytes: int = 0
    collectives: int = 0
    steps: int = 0  # backward passes that synchronised (DDP: the last bucket was reduced)

    @property
    def bytes_per_step(self) -> float:
        return self.bytes / self.steps if self.steps else 0.0

    def reset(self) -> None:
        self.bytes = self.collectives = self.steps = 0


# ----------------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------------


def wrap_ddp(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    active_only: bool = True,
    stats: CommStats | None = None,
    **ddp_kwargs,
) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(module, **ddp_kwargs)`` set up for DropMuon (module docs).

    Sets ``find_unused_parameters=True`` (refuses False) and refuses ``static_graph=True``;
    checks that the ranks agree (:func:`check_replicas`). ``active_only`` registers the
    communication hook that all-reduces only the active layers' parameters; a ``stats`` object
    counts the bytes sent (with ``active_only=False`` through a hook that does exactly what
    DDP's default does).
    """
    if ddp_kwargs.get("static_graph", False):
        raise ValueError(
            "DropMuon changes which parameters get gradients every step, which DDP's "
            "static_graph=True forbids; leave static_graph False"
        )
    if not ddp_kwargs.setdefault("find_unused_parameters", True):
        raise ValueError(
            "DropMuon needs find_unused_parameters=True: frozen layers get no gradient, and "
            "without it DDP waits for them"
        )
    group = ddp_kwargs.get("process_group")
    check_replicas(optimizer, group)
    ddp = nn.parallel.DistributedDataParallel(module, **ddp_kwargs)
    state = _HookState(group, stats, weakref.ref(optimizer))
    if active_only:
        ddp.register_comm_hook(state, _active_only_hook)
    elif stats is not None:
        ddp.register_comm_hook(state, _counting_allreduce_hook)
    return ddp


@dataclass
class _HookState:
    process_group: dist.ProcessGroup | None
    stats: CommStats | None
    optimizer: weakref.ref  # to the DropMuon whose coming step says which layers are active

    def is_active(self, p: Tensor) -> bool:
        optimizer = self.optimizer()
        return optimizer is None or optimizer.is_active(p)


def _all_reduce_mean(state: _HookState, tensor: Tensor) -> torch.futures.Future[Tensor]:
    """Averages tensor over the group in place, as DDP's default hook (divide, then sum)."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    tensor.div_(dist.get_world_size(group))
    if state.stats is not None:
        state.stats.bytes += tensor.numel() * tensor.element_size()
        state.stats.collectives += 1
    return dist.all_reduce(tensor, group=group, async_op=True).get_future()


def _count_step(state: _HookState, bucket) -> None:
    if state.stats is not None and bucket.is_last():
        state.stats.steps += 1


# DDP checks the hooks' annotations at registration: they must be these very objects.
def _counting_allreduce_hook(
    state: _HookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce, counted."""
    _count_step(state, bucket)
    buffer = bucket.buffer()
    return _all_reduce_mean(state, buffer).then(lambda fut: buffer)


def _active_ranges(state: _HookState, bucket) -> list[tuple[int, int]]:
    """[start, end) element ranges of the bucket buffer that belong to the active layers'
    parameters, adjacent ones merged. Dense buckets hold their parameters back to back in
    order."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    for p in bucket.parameters():
        end = offset + p.numel()
        if state.is_active(p) and end > offset:
            if ranges and ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((offset, end))
        offset = end
    if offset != bucket.buffer().numel():
        raise RuntimeError(
            f"dropmuon: unexpected DDP bucket layout ({offset} parameter elements, buffer of "
            f"{bucket.buffer().numel()}); use active_only=False"
        )
    return ranges


def _active_only_hook(
    state: _HookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """All-reduces (mean) only the parts of the bucket whose parameters the coming step updates.

    Every rank freezes the same layers, so every rank computes the same ranges and issues the
    same collectives. The parts of frozen parameters are returned as they are: DDP writes no
    gradient back for parameters that no rank used (find_unused_parameters=True)."""
    _count_step(state, bucket)
    buffer = bucket.buffer()
    ranges = _active_ranges(state, bucket)
    if not ranges:
        done: torch.futures.Future[Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done
    if len(ranges) == 1:
        start, end = ranges[0]
        piece = buffer.narrow(0, start, end - start)  # a view: reduced in place
        return _all_reduce_mean(state, piece).then(lambda fut: buffer)
    packed = torch.cat([buffer[start:end] for start, end in ranges])

    def unpack(fut):
        offset = 0
        for start, end in ranges:
            buffer[start:end].copy_(packed[offset : offset + end - start])
            offset += end - start
        return buffer

    return _all_reduce_mean(state, packed).then(unpack)


# ----------------------------------------------------------------------------------------------
# Without DDP
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def broadcast_parameters(module: nn.Module, src: int = 0, process_group=None) -> None:
    """Copies ``src``'s parameters and buffers to every rank (what DDP does at construction)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=src, group=process_group)


@torch.no_grad()
def all_reduce_gradients(
    optimizer: torch.optim.Optimizer, process_group=None, stats: CommStats | None = None
) -> None:
    """Averages over the ranks the gradients of the layers the coming step updates; call it
    after the backward pass (after the last micro-batch with gradient accumulation), before
    ``optimizer.step()``. Frozen layers cost nothing.

    One all-reduce per (device, dtype) of the active gradients, packed with one flag per
    parameter saying whether the rank had a gradient: a parameter that some rank left without
    one (unused in its forward) gets the average with zeros there, and one that no rank used
    keeps ``.grad`` None everywhere, so every rank's step does the same.
    """
    world = dist.get_world_size(process_group)
    by_kind: dict[tuple, list[Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if optimizer.is_active(p):
                by_kind.setdefault((p.device, p.dtype), []).append(p)
    for (device, dtype), params in sorted(by_kind.items(), key=lambda kv: str(kv[0])):
        sizes = [p.numel() for p in params]
        grads = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(n, device=device, dtype=dtype)
            for p, n in zip(params, sizes)
        ]
        flags = torch.tensor([p.grad is not None for p in params], device=device, dtype=dtype)
        packed = torch.cat(grads + [flags])
        packed.div_(world)
        if stats is not None:
            stats.bytes += packed.numel() * packed.element_size()
            stats.collectives += 1
        dist.all_reduce(packed, group=process_group)
        used = packed[-len(params) :] > 0
        for p, chunk, was_used in zip(params, packed[: -len(params)].split(sizes), used.tolist()):
            if not was_used:
                p.grad = None
            elif p.grad is None:
                p.grad = chunk.view_as(p).clone()
            else:
                p.grad.copy_(chunk.view_as(p.grad))
    if stats is not None:
        stats.steps += 1


# ----------------------------------------------------------------------------------------------
# Consistency
# ----------------------------------------------------------------------------------------------


def check_replicas(optimizer: torch.optim.Optimizer, process_group=None) -> None:
    """Raises RuntimeError on every rank unless all ranks agree on the optimizer's step, layer
    count, sampler (kind and seed) and the layers of the coming step: what drawing the same
    layers without communication relies on. One small all-gather; call it after building or
    loading the optimizer on every rank."""
    sampler = optimizer.sampler
    if isinstance(sampler, LayerSampler):
        sampler_key = f"{sampler.kind}:{sampler.seed}"
    else:
        sampler_key = type(sampler).__qualname__
    mask = "".join("1" if a else "0" for a in optimizer.active_layers)
    mine = [
        optimizer.step_count,
        optimizer.num_layers,
        zlib.crc32(sampler_key.encode()),
        zlib.crc32(mask.encode()),
    ]
    world = dist.get_world_size(process_group)
    gathered = [None] * world
    dist.all_gather_object(gathered, mine, group=process_group)
    if any(other != gathered[0] for other in gathered):
        rows = ", ".join(
            f"rank {r}: step {g[0]}, {g[1]} layers, sampler #{g[2]:08x}, mask #{g[3]:08x}"
            for r, g in enumerate(gathered)
        )
        raise RuntimeError(
            "DropMuon replicas disagree, so they would draw different layers (and DDP would "
            "hang or diverge). Build the optimizer with the same seed and load the same "
            f"checkpoint on every rank. {rows}"
        )
