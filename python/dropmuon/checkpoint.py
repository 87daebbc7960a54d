"""The ``"dropmuon"`` section of DropMuon's ``state_dict``: what it holds, its version, and the
checks a checkpoint passes before anything is restored.

The section sits in the first param group, ``state_dict["param_groups"][0]["dropmuon"]``, so that
converters which keep only ``state`` and ``param_groups`` (torch.distributed.checkpoint's
``get_optimizer_state_dict``) keep it; checkpoints with it at the top level (written before it
moved) load too. torch's part of the checkpoint keeps torch's layout
(``state[param]["momentum_buffer"]``; AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``;
``param_groups`` with the group options, plus ``layer``, ``param_norms`` and ``param_shapes``,
which the checks below compare). Everything is tensors, numbers, strings, lists and dicts, so a
checkpoint loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .adamw import ADAMW_STATE_KEYS
from .sampling import LayerSampler
from .smoothness import SmoothnessEstimator

# 2: the section in the first param group, and every parameter's state present (made at
# construction). 1: the section at the top level; parameters never updated had no state.
STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)
SECTION_KEYS = (
    "step",
    "num_layers",
    "sampler",
    "update_counts",
    "skipped_nonfinite",
    "smoothness",
    "last_step_norm",
)
PER_LAYER_KEYS = ("update_counts", "skipped_nonfinite", "smoothness", "last_step_norm")


def world_size() -> int:
    """The default process group's size, 1 outside torch.distributed."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


def _or_minus_one(values) -> list[float]:
    return [-1.0 if v is None else float(v) for v in values]


def _or_none(values) -> list[float | None]:
    return [None if v < 0 else v for v in values]


def section(
    *,
    step: int,
    layer_names: list[str],
    sampler,
    update_counts: list[int],
    skipped_nonfinite: list[int],
    estimator: SmoothnessEstimator,
    layer_order: str,
) -> dict:
    """The ``"dropmuon"`` section (estimates not made yet are saved as -1). ``layer_order``
    (what ordered the layers) tells a checkpoint written before the first forward pass, whose
    order is not final; checkpoints without it (older ones) count as final."""
    return dict(
        version=STATE_VERSION,
        step=step,
        num_layers=len(layer_names),
        layer_names=layer_names,
        sampler=sampler.state_dict() if hasattr(sampler, "state_dict") else None,
        update_counts=list(update_counts),
        skipped_nonfinite=list(skipped_nonfinite),
        smoothness=_or_minus_one(estimator.smoothness),
        last_step_norm=_or_minus_one(estimator.last_step_norm),
        layer_order=layer_order,
        world_size=world_size(),
    )


def section_of(state_dict) -> dict | None:
    """The ``"dropmuon"`` section: in the first param group, or at the top level (checkpoints
    written before it moved)."""
    if not isinstance(state_dict, dict):
        return None
    groups = state_dict.get("param_groups")
    if isinstance(groups, list) and groups and isinstance(groups[0], dict):
        if "dropmuon" in groups[0]:
            return groups[0]["dropmuon"]
    return state_dict.get("dropmuon")


def restore_estimates(estimator: SmoothnessEstimator, extra: dict) -> None:
    """The section's estimates back into ``estimator``."""
    estimator.smoothness = _or_none(extra["smoothness"])
    estimator.last_step_norm = _or_none(extra["last_step_norm"])


def validate(
    state_dict,
    *,
    param_groups: list[dict],
    num_layers: int,
    param_name,
    positions_final: bool,
) -> dict:
    """Raises ValueError unless ``state_dict`` was written by a DropMuon optimizer over the same
    model, partition and norms as ``param_groups`` (``param_name(p)`` names a parameter in
    messages; ``positions_final``: the layers' positions are settled, so they must match too).
    Returns the ``"dropmuon"`` section."""
    extra = section_of(state_dict)
    if extra is None:
        raise ValueError("not a DropMuon checkpoint: it has no 'dropmuon' section")
    if extra.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"unsupported DropMuon checkpoint version {extra.get('version')!r}")
    missing = [key for key in SECTION_KEYS if key not in extra]
    if missing or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError(
            f"incomplete DropMuon checkpoint: missing {missing or ['state/param_groups']}"
        )
    if extra["num_layers"] != num_layers:
        raise ValueError(
            f"checkpoint has {extra['num_layers']} layers, this optimizer "
            f"{num_layers}: a different model or partition"
        )
    for key in PER_LAYER_KEYS:
        if len(extra[key]) != num_layers:
            raise ValueError(f"checkpoint's {key} has {len(extra[key])} entries, not one per layer")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"checkpoint has {len(saved_groups)} param groups, this optimizer "
            f"{len(param_groups)}: a different model or partition"
        )
    if sorted({g.get("layer") for g in saved_groups}) != list(range(num_layers)):
        raise ValueError("checkpoint's layer indices are not 0..num_layers-1")
    for g_index, (mine, saved) in enumerate(zip(param_groups, saved_groups)):
        _check_group(g_index, mine, saved, param_name, positions_final)
    # Each parameter's saved state must fit it, or the first step would fail half-way.
    saved_ids = [key for saved in saved_groups for key in saved["params"]]
    params = [p for group in param_groups for p in group["params"]]
    for key, p in zip(saved_ids, params):
        _check_param_state(state_dict["state"].get(key, {}), p, param_name(p))
    return extra


def _check_group(g_index, mine, saved, param_name, positions_final) -> None:
    if len(mine["params"]) != len(saved["params"]):
        raise ValueError(
            f"param group {g_index} has {len(saved['params'])} parameters in the "
            f"checkpoint and {len(mine['params'])} here: a different model or partition"
        )
    if saved.get("param_norms") != mine["param_norms"]:
        raise ValueError(
            f"param group {g_index} has norms {saved.get('param_norms')} in the "
            f"checkpoint and {mine['param_norms']} here: a different configuration"
        )
    if positions_final and saved.get("layer") != mine["layer"]:
        raise ValueError(
            f"param group {g_index} is layer {saved.get('layer')} in the checkpoint and "
            f"{mine['layer']} here: a different partition"
        )
    shapes = saved.get("param_shapes", [None] * len(mine["params"]))
    for p, shape in zip(mine["params"], shapes):
        if shape is not None and tuple(shape) != tuple(p.shape):
            raise ValueError(
                f"parameter {param_name(p)} has shape {tuple(p.shape)} here "
                f"and {tuple(shape)} in the checkpoint: a different model"
            )


def _check_param_state(entry: dict, p: Tensor, name: str) -> None:
    adamw = [k for k in ADAMW_STATE_KEYS if k in entry]
    if 0 < len(adamw) < len(ADAMW_STATE_KEYS):
        raise ValueError(f"the checkpoint's AdamW state of {name} is incomplete: {adamw}")
    for k, value in entry.items():
        if k != "step" and isinstance(value, Tensor) and value.shape != p.shape:
            raise ValueError(
                f"the checkpoint's {k} of {name} has shape {tuple(value.shape)}, the "
                f"parameter {tuple(p.shape)}: a corrupted checkpoint"
            )


def restored_sampler(sampler, saved: dict | None):
    """The sampler with the checkpoint's state. A built-in sampler is restored on a copy, so
    that a mismatch (ValueError) changes nothing; a user sampler's ``load_state_dict`` does its
    own checks in place."""
    if saved is None:
        return sampler
    if isinstance(sampler, LayerSampler):
        restored = copy.deepcopy(sampler)
        restored.load_state_dict(saved)
        return restored
    if hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(saved)
    return sampler
