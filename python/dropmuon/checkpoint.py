"""The ``"dropmuon"`` section of DropMuon's ``state_dict``: what it holds, its version, and the
checks a checkpoint passes before anything is restored.

The section sits in the first param group, ``state_dict["param_groups"][0]["dropmuon"]``, so that
converters which keep only ``state`` and ``param_groups`` (torch.distributed.checkpoint's
``get_optimizer_state_dict``) keep it. It holds the step, the sampler, the per-layer statistics
and, per param group, each parameter's layer position, norm and shape, which the checks below
compare. torch's part of the checkpoint keeps torch's layout (``state[param]["momentum_buffer"]``;
AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``; ``param_groups`` as the user passed them, with
their options and ``param_names``). dropmuon 0.1's checkpoints (versions 1 and 2: one param
group per layer holding ``layer``, ``param_norms`` and ``param_shapes``; version 1 with the section
at the top level) are brought to this form by :func:`upgraded`. Everything is tensors, numbers,
strings, lists and dicts, so a checkpoint loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .layers.partition import Layer
from .layers.sampling import LayerSampler
from .step.adamw import ADAMW_STATE_KEYS

if TYPE_CHECKING:  # the section is written from, and checked against, the optimizer's layers
    from .layers.book import LayerBook

# 3: param groups as the user passed them; each parameter's layer, norm and shape in the section.
# 2: one param group per layer, with "layer", "param_norms" and "param_shapes" in each; every
# parameter's state present (made at construction). 1: as 2, with the section at the top level
# and no state for parameters never updated.
# What the smoothness estimates are measured in (layers/smoothness.py); checkpoints without it
# hold estimates on the old per-geometry scale, which are not loaded.
SMOOTHNESS_SCALE = "rms-operator"
STATE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# The keys dropmuon 0.1 (versions 1-2) kept in each param group.
V2_GROUP_KEYS = ("layer", "param_norms", "param_shapes")
SECTION_KEYS = (
    "step",
    "num_layers",
    "sampler",
    "update_counts",
    "skipped_nonfinite",
    "smoothness",
    "last_step_norm",
    "param_layers",
    "param_norms",
    "param_shapes",
)
PER_GROUP_KEYS = ("param_layers", "param_norms", "param_shapes")
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


def section(layers: LayerBook, step: int) -> dict:
    """The ``"dropmuon"`` section of an optimizer at ``step`` with ``layers`` (estimates not
    made yet are saved as -1). ``layer_order`` (what ordered the layers) tells a checkpoint
    written before the first forward pass, whose order is not final; checkpoints without it
    (older ones) count as final. ``param_*``: each parameter's layer position, norm and shape,
    one list per param group."""
    per_group = [group["params"] for group in layers.groups]
    sampler, estimator = layers.sampler, layers.smoothness
    return dict(
        version=STATE_VERSION,
        step=step,
        num_layers=layers.num_layers,
        layer_names=layers.layer_names(),
        sampler=sampler.state_dict() if hasattr(sampler, "state_dict") else None,
        update_counts=list(layers.update_counts),
        skipped_nonfinite=list(layers.skipped_nonfinite),
        smoothness=_or_minus_one(estimator.smoothness),
        last_step_norm=_or_minus_one(estimator.last_step_norm),
        smoothness_scale=SMOOTHNESS_SCALE,
        layer_order=layers.order,
        world_size=world_size(),
        param_layers=[[layers.position(p) for p in params] for params in per_group],
        param_norms=[[layers.norm(p) for p in params] for params in per_group],
        param_shapes=[[list(p.shape) for p in params] for params in per_group],
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


def upgraded(state_dict, num_groups: int):
    """A version 1-2 checkpoint (one param group per layer, each with ``layer``,
    ``param_norms`` and ``param_shapes``) in version 3's form: those keys move into the section,
    and when this optimizer has one param group (a module or a parameter list) the saved groups
    merge into one, which needs their options to be equal. Version 3 comes back as it is."""
    extra = section_of(state_dict)
    if extra is None or extra.get("version") not in (1, 2):
        return state_dict
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not groups or any(k not in groups[0] for k in V2_GROUP_KEYS):
        raise ValueError("incomplete DropMuon checkpoint (version 1-2): param groups lack layers")
    per_group = {
        "param_layers": [[g["layer"]] * len(g["params"]) for g in groups],
        "param_norms": [list(g["param_norms"]) for g in groups],
        "param_shapes": [list(g["param_shapes"]) for g in groups],
    }
    options = [
        {k: v for k, v in g.items() if k not in ("params", "dropmuon", *V2_GROUP_KEYS)}
        for g in groups
    ]
    if num_groups == 1 and len(groups) > 1:
        if any(o != options[0] for o in options):
            raise ValueError(
                "this dropmuon 0.1 checkpoint has param groups with different options, which "
                "cannot merge into this optimizer's one group: build the optimizer from param "
                "groups like those it was saved with"
            )
        options = [options[0]]
        params = [[key for g in groups for key in g["params"]]]
        per_group = {key: [sum(lists, [])] for key, lists in per_group.items()}
    else:
        params = [g["params"] for g in groups]
    section = dict(extra, version=2 if extra["version"] == 2 else 1, **per_group)
    new_groups = [dict(o, params=keys) for o, keys in zip(options, params)]
    new_groups[0]["dropmuon"] = section
    upgraded = {k: v for k, v in state_dict.items() if k != "dropmuon"}
    upgraded["param_groups"] = new_groups
    return upgraded


def validate(state_dict, layers: LayerBook, positions_final: bool) -> dict:
    """Raises ValueError unless ``state_dict`` (in version 3's form, see :func:`upgraded`) was
    written by a DropMuon optimizer over the same model, partition and shapes as ``layers``
    (``positions_final``: the layers' positions are settled, so they must match too). Returns
    the checkpoint's position of each layer (layer -> position)."""
    param_groups, num_layers, param_name = layers.groups, layers.num_layers, layers.name
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
    for key in PER_GROUP_KEYS:
        if len(extra[key]) != len(param_groups):
            raise ValueError(f"checkpoint's {key} has {len(extra[key])} groups, not one per group")
    positions: dict = {}
    for g_index, (mine, saved) in enumerate(zip(param_groups, saved_groups)):
        if len(mine["params"]) != len(saved["params"]) or any(
            len(extra[key][g_index]) != len(saved["params"]) for key in PER_GROUP_KEYS
        ):
            raise ValueError(
                f"param group {g_index} has {len(saved['params'])} parameters in the "
                f"checkpoint and {len(mine['params'])} here: a different model or partition"
            )
        for p, position, shape in zip(
            mine["params"], extra["param_layers"][g_index], extra["param_shapes"][g_index]
        ):
            if tuple(shape) != tuple(p.shape):
                raise ValueError(
                    f"parameter {param_name(p)} has shape {tuple(p.shape)} here "
                    f"and {tuple(shape)} in the checkpoint: a different model"
                )
            layer = layers.partition.layer_of[id(p)]
            if positions.setdefault(layer, position) != position:
                raise ValueError(
                    f"parameter {param_name(p)} is in layer {position} in the checkpoint, "
                    f"the rest of its layer in {positions[layer]}: a different partition"
                )
            if positions_final and position != layer.position:
                raise ValueError(
                    f"parameter {param_name(p)} is in layer {position} in the checkpoint and "
                    f"{layer.position} here: a different partition"
                )
    if sorted(positions.values()) != list(range(num_layers)):
        raise ValueError("checkpoint's layer positions are not 0..num_layers-1, one per layer")
    # Each parameter's saved state must fit it, or the first step would fail half-way.
    saved_ids = [key for saved in saved_groups for key in saved["params"]]
    params = [p for group in param_groups for p in group["params"]]
    for key, p in zip(saved_ids, params):
        _check_param_state(state_dict["state"].get(key, {}), p, param_name(p))
    return positions


def check_norms(state_dict, norms: dict[int, str], layers: LayerBook) -> None:
    """Raises ValueError unless the checkpoint's norm of every parameter is ``norms[id(p)]``."""
    saved = section_of(state_dict)["param_norms"]
    param_name = layers.name
    for g_index, (group, saved_norms) in enumerate(zip(layers.groups, saved)):
        for p, norm in zip(group["params"], saved_norms):
            if norm != norms[id(p)]:
                raise ValueError(
                    f"parameter {param_name(p)} has norm {norm!r} in the checkpoint and "
                    f"{norms[id(p)]!r} here (param group {g_index}): a different configuration"
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


@dataclass
class Checked:
    """A checkpoint validated against an optimizer's layers, ready to load: its section, each
    layer's saved position, the live state kept for what it leaves out, the restored sampler,
    and whether its layer order ends the first-forward trace."""

    section: dict
    positions: dict
    kept: dict
    sampler: object
    adopt_order: bool
    smoothness: list[float | None]  # the estimates, None where not made yet
    last_step_norm: list[float | None]


def checked(state_dict, layers: LayerBook, state) -> Checked:
    """Validates ``state_dict`` (version 3's form) against ``layers`` and the optimizer's
    ``state``; raises ValueError (or TypeError, KeyError) and changes nothing on a mismatch."""
    extra = section_of(state_dict)
    positions_final = layers.trace is None
    positions = validate(state_dict, layers, positions_final)
    check_norms(state_dict, layers.norms_at(positions), layers)
    kept = state_kept_in_place(state_dict, state, layers)
    sampler = restored_sampler(layers.sampler, extra["sampler"])
    # With the trace still to come, a checkpoint whose order is final ends it; one written
    # before any forward (accelerate's round trip, say) leaves it to run.
    order = str(extra.get("layer_order", ""))
    adopt = not positions_final and not order.startswith("registration")
    estimates = _or_none(extra["smoothness"]), _or_none(extra["last_step_norm"])
    if extra.get("smoothness_scale") != SMOOTHNESS_SCALE:
        # Written before the estimates were on one scale: they are made again, not mixed.
        estimates = [None] * len(estimates[0]), [None] * len(estimates[1])
    return Checked(extra, positions, kept, sampler, adopt, *estimates)


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


def saved_layers(state_dict, layers: LayerBook):
    """``(layers, layer order)`` for ``layers``' parameters from a checkpoint's saved positions
    (one per parameter, in param-group order), for an optimizer whose layers are still
    pending; None when the checkpoint has none to give (written while pending too, or a
    mismatch that :func:`validate` names)."""
    extra = section_of(state_dict)
    params = list(layers.params())
    if extra is None or str(extra.get("layer_order", "")).startswith("pending"):
        return None
    if "param_layers" not in extra:
        return None  # a 0.1 checkpoint not brought to version 3: validate() says so
    saved = [position for positions in extra["param_layers"] for position in positions]
    names = list(extra.get("layer_names") or [])
    if len(saved) != len(params) or not saved:
        return None
    count = max(saved) + 1
    found = [Layer(i, names[i] if i < len(names) else f"layer {i}") for i in range(count)]
    for p, position in zip(params, saved):
        if 0 <= position < count:
            found[position].params.append((layers.name(p), p))
    return [layer for layer in found if layer.params], extra.get("layer_order", "checkpoint")


def state_kept_in_place(state_dict, state, layers: LayerBook) -> dict:
    """The live state to keep for the parameters ``state_dict`` leaves out. A checkpoint
    holds every parameter's state, but torch.distributed.checkpoint's
    ``set_optimizer_state_dict`` leaves out that of parameters that do not require grad
    (frozen by the user), after ``dcp.load`` has loaded it into the very tensors
    ``get_optimizer_state_dict`` returned, the optimizer's own (``state``): those are kept. Any
    other gap raises ValueError (that state would be lost). Version 1 checkpoints left out the
    parameters never updated, which then start from zeros."""
    if section_of(state_dict)["version"] < 2:
        return {}
    params, param_name = list(layers.params()), layers.name
    saved_ids = [key for g in state_dict["param_groups"] for key in g["params"]]
    saved_state = state_dict["state"]
    in_place = any(
        value is state[p].get(name)
        for key, p in zip(saved_ids, params)
        if key in saved_state
        for name, value in saved_state[key].items()
        if isinstance(value, Tensor)
    )
    kept = {}
    for key, p in zip(saved_ids, params):
        if key in saved_state:
            continue
        if p.requires_grad:
            raise ValueError(
                f"the checkpoint has no state for {param_name(p)}: an incomplete checkpoint"
            )
        if not in_place:
            raise ValueError(
                f"the checkpoint has no state for {param_name(p)}, which does not "
                "require grad: dcp.load into get_optimizer_state_dict's tensors before "
                "set_optimizer_state_dict"
            )
        kept[p] = state[p]
    return kept
