"""The step math of DropMuon, as plain functions: the optimizer orchestrates, these compute.

- :func:`buckets`: the active parameters gathered into fused calls (same shape, dtype, device
  and arguments share one call).
- :func:`update_bucket_`: one bucket's update: :func:`sharp_update_` (one fused call, with
  the momentum buffers it needs) or AdamW (:mod:`dropmuon.step.adamw`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..dtensors import local_tensor
from ..kernels import ops
from ..update_rules import NewtonSchulzSchedule, UpdateArguments
from .adamw import adamw_initial_state, adamw_step_


@dataclass
class Bucket:
    """Parameters updated by one call: a fused sharp update (``arguments``), or AdamW
    (``norm == "adamw"``, one group, ``arguments`` None)."""

    group: dict
    norm: str
    arguments: UpdateArguments | None
    params: list[Tensor] = field(default_factory=list)


def buckets(
    active: Iterable[tuple[dict, str, Tensor]], schedules: dict[int, NewtonSchulzSchedule]
) -> list[Bucket]:
    """Gathers ``(group, norm, param)`` entries into calls: tensors of the same shape, dtype and
    device whose update arguments are equal share one (whatever their groups); AdamW
    parameters are bucketed by group. ``schedules`` maps ``id(group)`` to its schedule."""
    arguments_of: dict[tuple[int, str], UpdateArguments] = {}
    found: dict[tuple, Bucket] = {}
    for group, norm, p in active:
        if norm == "adamw":
            key, arguments = ("adamw", id(group)), None
        else:
            arguments = arguments_of.get((id(group), norm))
            if arguments is None:
                arguments = UpdateArguments.of_group(group, norm, schedules[id(group)])
                arguments_of[(id(group), norm)] = arguments
            key = (tuple(p.shape), p.dtype, p.device, arguments)
        bucket = found.get(key)
        if bucket is None:
            bucket = found[key] = Bucket(group, norm, arguments)
        bucket.params.append(p)
    return list(found.values())


def momentum_buffer(state: dict, p: Tensor) -> Tensor:
    """``state["momentum_buffer"]`` of ``p``, made on first use. Row-major whatever p's layout:
    the kernels update (rows x cols) matrices in place, and a channels_last buffer would not be
    one."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
    elif not state["momentum_buffer"].is_contiguous():  # e.g. from an older checkpoint
        state["momentum_buffer"] = state["momentum_buffer"].contiguous()
    return state["momentum_buffer"]


def initialize_state(params_and_norms: Iterable[tuple[Tensor, str]], state) -> None:
    """Every parameter's state as its first update would make it (zeros), where missing:
    the momentum buffer, or AdamW's state for parameters on the ``"adamw"`` norm."""
    for p, norm in params_and_norms:
        if norm == "adamw":
            adamw_initial_state(state[p], p)
        else:
            momentum_buffer(state[p], p)


def sharp_update_(
    params: list[Tensor], state, arguments: UpdateArguments, cuda_kernels: bool | None = None
) -> None:
    """One fused update of same-shape parameters in place from their ``.grad``, with their
    momentum buffers in ``state`` (the optimizer's per-parameter state); ``cuda_kernels``: see
    :func:`dropmuon.kernels.ops.use_kernel`. DTensor parameters are updated on their local shards
    (right for elementwise norms only: :mod:`dropmuon.distributed.fsdp` sends the others
    elsewhere)."""
    grads = [local_tensor(p.grad) for p in params]
    bufs = [local_tensor(momentum_buffer(state[p], p)) for p in params]
    targets = [local_tensor(p) for p in params]
    # Parameters stored otherwise (channels_last conv kernels, transposed views) are updated
    # through a row-major copy that is written back.
    work = [t if t.is_contiguous() else t.contiguous() for t in targets]
    ops.muon_update_(work, grads, bufs, arguments, cuda_kernels=cuda_kernels)
    for t, w in zip(targets, work):
        if w is not t:
            t.copy_(w)


def update_bucket_(bucket: Bucket, state, cuda_kernels: bool | None = None) -> None:
    """Updates a bucket's parameters in place: AdamW, or the fused sharp update."""
    if bucket.norm == "adamw":
        adamw_step_(bucket.params, state, bucket.group)
    else:
        sharp_update_(bucket.params, state, bucket.arguments, cuda_kernels)
