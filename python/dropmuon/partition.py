"""What DropMuon's layers are: from a module, a parameter list or param groups to ordered layers,
and each parameter's norm.

A layer of a module is a module that directly holds trainable parameters
(``named_parameters(recurse=False)`` that require grad, or that a DropMuon optimizer froze). A
parameter held by several modules (a tied embedding and output head) belongs to the first of
them in registration order, and a module left with no parameter of its own is no layer. Layers
are ordered by when their ``forward`` first starts in the first forward pass (traced with
forward pre-hooks, :class:`FirstForwardTrace`), and by registration order until that pass has
run.

Two numbers describe a layer, and they are kept apart: its **construction index**
(``Layer.construction_index``: the order in which it was found, fixed) and its **position**
(``group["layer"]`` of its param groups: 0 is the input side, the order the sampler and the
checkpoints use; it changes once, when the first forward has been traced).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .defaults import DEFAULT_ROLE_NORMS, FALLBACKS, NORMS, ROLES
from .truncation import frozen_by_dropmuon


@dataclass
class Layer:
    """One layer: a module (or param groups sharing a ``"layer"`` value) and its parameters."""

    construction_index: int
    name: str
    params: list[tuple[str, Tensor]] = field(default_factory=list)
    module: nn.Module | None = None


@dataclass
class Partition:
    """What the optimizer is built from: the layers, one param group per layer of a module (or
    the user's groups), the layer of each group, and each parameter's name for messages."""

    layers: list[Layer]
    groups: list[dict]
    group_layers: list[Layer]  # group_layers[i] is the layer of groups[i]
    names: dict[int, str]  # id(param) -> name


def partition(params) -> Partition:
    """The layers of a module, a parameter list, (name, parameter) pairs or param group dicts
    (see DropMuon's ``params`` argument). Groups come back with ``"layer"`` set to the layer's
    position (the registration order for a module, until its first forward is traced)."""
    if isinstance(params, nn.Module):
        layers = module_layers(params)
        groups = [
            {"params": [p for _, p in layer.params], "layer": layer.construction_index}
            for layer in layers
        ]
        names = {id(p): n for layer in layers for n, p in layer.params}
        return Partition(layers, groups, list(layers), names)
    return _partition_groups(params)


def module_layers(model: nn.Module) -> list[Layer]:
    """The layers of a module in registration order (see the module docstring)."""
    owned: set[int] = set()
    layers: list[Layer] = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        params = []
        for param_name, param in module.named_parameters(recurse=False):
            trainable = param.requires_grad or frozen_by_dropmuon(param)
            if trainable and id(param) not in owned:
                owned.add(id(param))
                params.append((f"{module_name}.{param_name}" if module_name else param_name, param))
        if params:
            layers.append(Layer(len(layers), module_name or type(model).__name__, params, module))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return layers


def _is_named(entry) -> bool:
    """A (name, parameter) pair, as model.named_parameters() yields."""
    return (
        isinstance(entry, tuple)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], Tensor)
    )


def _partition_groups(params) -> Partition:
    """Layers from parameters or group dicts: one layer per tensor, or per ``"layer"`` value."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or "
            f"dicts, but got {torch.typename(params)}"
        )
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if all(isinstance(item, Tensor) or _is_named(item) for item in items):
        items = [{"params": [p]} for p in items]
    if not all(isinstance(item, dict) for item in items):
        raise TypeError(
            "params must be a module, parameters, (name, parameter) pairs, or param group "
            "dicts, not a mix"
        )
    with_layer = ["layer" in g for g in items]
    if any(with_layer) and not all(with_layer):
        raise ValueError("either every param group has a 'layer' index or none does")
    groups, keys, given_names = [], [], []
    for g_index, group in enumerate(items):
        group = dict(group)
        entries = group["params"]
        entries = [entries] if isinstance(entries, Tensor) or _is_named(entries) else entries
        entries = list(entries)
        named = [_is_named(e) for e in entries]
        given_names.append([e[0] if n else None for e, n in zip(entries, named)])
        group["params"] = [e[1] if n else e for e, n in zip(entries, named)]
        layer_key = group.get("layer", g_index)
        if not isinstance(layer_key, int) or isinstance(layer_key, bool):
            raise ValueError(f"param group {g_index}: 'layer' must be an int, got {layer_key!r}")
        if len({id(p) for p in group["params"]}) != len(group["params"]):
            # torch only warns; here the parameter would be updated twice per step.
            raise ValueError(
                f"param group {g_index} is a parameter group with duplicate parameters"
            )
        for p in group["params"]:
            if isinstance(p, Tensor) and not p.requires_grad:
                raise ValueError(
                    f"param group {g_index} holds a parameter that does not require grad; "
                    "DropMuon sets requires_grad itself, so leave frozen parameters out"
                )
        groups.append(group)
        keys.append(layer_key)
    flat = [n is not None for names_ in given_names for n in names_]
    if any(flat) and not all(flat):
        raise ValueError(
            "all optimizer params should be with/without names. Some param names are missing"
        )
    # Layers ordered by their 'layer' value, renumbered 0..b-1: position = construction index.
    positions = {key: position for position, key in enumerate(sorted(set(keys)))}
    layers = [Layer(position, f"layer {key}") for key, position in positions.items()]
    names, group_layers = {}, []
    for g_index, (group, key) in enumerate(zip(groups, keys)):
        layer = layers[positions[key]]
        group["layer"] = layer.construction_index
        group_layers.append(layer)
        for p_index, p in enumerate(group["params"]):
            name = given_names[g_index][p_index] or f"param_groups[{g_index}][{p_index}]"
            names[id(p)] = name
            layer.params.append((name, p))
    return Partition(layers, groups, group_layers, names)


# ----------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------


def param_role(layer: Layer, param: Tensor, is_last_layer: bool) -> str:
    """``embedding`` (an nn.Embedding's weight), ``head`` (a matrix of the last layer),
    ``matrix`` (any other parameter with 2+ dimensions) or ``vector`` (0-D and 1-D)."""
    if param.dim() < 2:
        return "vector"
    if isinstance(layer.module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return "head" if is_last_layer else "matrix"


def resolve_norm(role: str, norms: dict[str, str], fallback: str) -> str:
    """The norm for a role: the user's override, else the default (vectors get ``fallback``)."""
    if role in norms:
        return norms[role]
    return fallback if role == "vector" else DEFAULT_ROLE_NORMS[role]


def check_norms(norms: dict | None, fallback: str) -> dict[str, str]:
    """The ``norms`` overrides by role, checked; ``fallback`` checked too."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be 'sign' or 'adamw', got {fallback!r}")
    norms = dict(norms or {})
    for role, norm in norms.items():
        if role not in ROLES:
            raise ValueError(f"norms: unknown role {role!r}; roles are {', '.join(ROLES)}")
        if norm not in NORMS:
            raise ValueError(f"norms[{role!r}]: unknown norm {norm!r}; use {', '.join(NORMS)}")
    return norms


def assign_norms(
    groups: list[dict], group_layers: list[Layer], norms: dict[str, str], fallback: str
) -> None:
    """Sets each group's ``"param_norms"``: its ``"norm"`` if not ``"auto"``, else each
    parameter's role's norm. Needs the final positions: the head is the last layer."""
    last = max(group["layer"] for group in groups)
    for group, layer in zip(groups, group_layers):
        if group["norm"] != "auto":
            group["param_norms"] = [group["norm"]] * len(group["params"])
            continue
        roles = [param_role(layer, p, group["layer"] == last) for p in group["params"]]
        group["param_norms"] = [resolve_norm(role, norms, fallback) for role in roles]


# ----------------------------------------------------------------------------------------------
# The order of the first forward
# ----------------------------------------------------------------------------------------------


class FirstForwardTrace:
    """Orders layers by the first forward pass. ``on_layer(layer, position)`` runs inside each
    layer's forward pre-hook when the layer is first reached, so the caller can set
    ``requires_grad`` for the draw of step 0 before the layer records any autograd graph."""

    def __init__(self, layers: list[Layer], on_layer: Callable[[Layer, int], None]) -> None:
        self.layers = layers
        self.positions: dict[int, int] = {}  # construction index -> position in the forward
        self.on_layer = on_layer
        self.handles = [
            layer.module.register_forward_pre_hook(self._hook(layer))
            for layer in layers
            if layer.module is not None
        ]

    def _hook(self, layer: Layer):
        def hook(module, args):
            if layer.construction_index not in self.positions:
                position = len(self.positions)
                self.positions[layer.construction_index] = position
                self.on_layer(layer, position)

        return hook

    def finish(self) -> dict[int, int]:
        """Removes the hooks; returns each layer's position, construction index -> position
        (layers that never ran follow in registration order)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        ran = sorted(self.positions, key=self.positions.get)
        never = [
            layer.construction_index
            for layer in self.layers
            if layer.construction_index not in self.positions
        ]
        return {index: position for position, index in enumerate(ran + never)}
