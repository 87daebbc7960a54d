"""What DropMuon's layers are: from a module, a parameter list or param groups to ordered layers,
and each parameter's norm.

The param groups are what the user passed (a module stands for one group of its trainable
parameters, with their names); the layers are a partition of the same parameters kept beside
them. A layer of a module is a module that directly holds trainable parameters
(``named_parameters(recurse=False)`` that require grad at construction). A parameter held by
several modules (a tied embedding and output head) belongs to the first of them in
registration order, and a module left with no parameter of its own is no layer. Layers are
ordered by where the first forward pass first uses their parameters (:mod:`.trace`),
and by registration order until that pass has run. A parameter list, or groups without
``"layer"`` keys, are split the same way, by the modules of the model the first forward runs
(the optimizer finds it then); groups with ``"layer"`` keys give one layer per key.

Two numbers describe a layer, and they are kept apart: its **construction index**
(``Layer.construction_index``: the order in which it was found, fixed) and its **position**
(``Layer.position``: 0 is the input side, the order the sampler and the checkpoints use; it
changes once, when the first forward has been traced).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..defaults import DEFAULT_ROLE_NORMS, FALLBACKS, NORMS, ROLES


@dataclass(eq=False)
class Layer:
    """One layer: a module (or the parameters sharing a ``"layer"`` key, or one tensor) and its
    parameters. ``position`` is its place in the forward, 0 on the input side."""

    construction_index: int
    name: str
    params: list[tuple[str, Tensor]] = field(default_factory=list)
    module: nn.Module | None = None
    position: int = -1
    key: int | None = None  # the "layer" value of its param groups, if they had one
    # Embedding weights among the params of a layer of several modules (a depth unit), whose
    # ``module`` cannot say which are (see :func:`param_role`).
    embeddings: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.position < 0:
            self.position = self.construction_index


@dataclass
class Partition:
    """The layers in construction order, and each parameter's layer (``layer_of[id(p)]``)."""

    layers: list[Layer]
    layer_of: dict[int, Layer]

    @classmethod
    def of(cls, layers: list[Layer]) -> Partition:
        return cls(layers, {id(p): layer for layer in layers for _, p in layer.params})

    def by_position(self) -> list[Layer]:
        return sorted(self.layers, key=lambda layer: layer.position)

    def rename(self, names: dict[int, str]) -> None:
        """New parameter names (``id(p) -> name``; a loaded checkpoint's ``param_names``): the
        layers' lists follow, and so does a one-tensor layer named after its tensor."""
        for layer in self.layers:
            if layer.module is None and layer.key is None and len(layer.params) == 1:
                layer.name = names[id(layer.params[0][1])]
            layer.params = [(names[id(p)], p) for _, p in layer.params]

    def extended(self, group: dict, names: dict[int, str], model: nn.Module | None, layering: str):
        """This partition with a new param group's parameters; returns it and the new layers.
        A module-built partition gives each parameter its layer in the model (by ``layering``:
        a module that was no layer becomes one); with ``"layer"`` keys a group joins its key's
        layer or makes one, placed by key; otherwise the group is one new layer on top."""
        layers = list(self.layers)
        new: list[Layer] = []
        if model is not None:
            managed = set(self.layer_of) | {id(p) for p in group["params"]}
            for found in model_layers(model, managed, layering):
                layer = next(
                    (self.layer_of[id(p)] for _, p in found.params if id(p) in self.layer_of), None
                )  # the layer that already holds some of its parameters
                if layer is None:
                    found.construction_index = found.position = len(layers)
                    layers.append(found)
                    new.append(found)
                else:
                    layer.params, layer.embeddings = found.params, found.embeddings
            placed = {id(p) for layer in layers for _, p in layer.params}
            for p in group["params"]:  # not the model's (an optimizer built from a list): alone
                if id(p) not in placed:
                    loose = Layer(len(layers), names[id(p)], [(names[id(p)], p)])
                    layers.append(loose)
                    new.append(loose)
            return Partition.of(layers), new
        params = [(names[id(p)], p) for p in group["params"]]
        key = group.get("layer")
        joined = next((layer for layer in layers if key is not None and layer.key == key), None)
        if joined is not None:
            joined.params.extend(params)
            return Partition.of(layers), new
        index = len(layers)
        layer = Layer(index, f"layer {key}" if key is not None else params[0][0], params, key=key)
        layers.append(layer)
        new.append(layer)
        if key is not None:  # positions by key order
            for position, keyed in enumerate(sorted(layers, key=lambda lay: lay.key)):
                keyed.position = position
        return Partition.of(layers), new


def module_groups(model: nn.Module) -> list[dict]:
    """The param group an ``nn.Module`` stands for: its parameters that require grad, each once
    (a tied weight under the name of the first module that registers it), with their names,
    in registration order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return [{"params": named}]


def _held_params(model: nn.Module, managed: set[int] | None):
    """``(module name, module, [(param name, param)])`` for each module in registration order
    that directly holds managed parameters (with ``managed`` None: those requiring grad), each
    parameter under the first module that holds it."""
    owned: set[int] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        params = []
        for param_name, param in module.named_parameters(recurse=False):
            wanted = param.requires_grad if managed is None else id(param) in managed
            if wanted and id(param) not in owned:
                owned.add(id(param))
                params.append((f"{module_name}.{param_name}" if module_name else param_name, param))
        if params:
            yield module_name, module, params


def module_layers(model: nn.Module, managed: set[int] | None = None) -> list[Layer]:
    """The layers of a module in registration order (see the module docstring); with
    ``managed`` (parameter ids), only those parameters count."""
    layers: list[Layer] = []
    for module_name, module, params in _held_params(model, managed):
        layers.append(Layer(len(layers), module_name or type(model).__name__, params, module))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return layers


def model_layers(model: nn.Module, managed: set[int] | None, layering: str) -> list[Layer]:
    """The layers of ``model`` by ``layering``: ``"modules"`` (:func:`module_layers`) or
    ``"blocks"`` (:func:`block_layers`)."""
    return block_layers(model, managed) if layering == "blocks" else module_layers(model, managed)


def block_containers(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """The repeated-block containers of ``model``, outermost first in registration order, each
    with its blocks: an nn.ModuleList or nn.Sequential two or more of whose children holding
    parameters are of one class (transformer blocks, ResNet stages' blocks); its blocks are
    its children holding parameters. A container inside another's block is not one."""
    found: list[tuple[str, list[tuple[str, nn.Module]]]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        if any(name.startswith(f"{block}.") for _, blocks in found for block, _ in blocks):
            continue
        children = [
            (f"{name}.{child_name}" if name else child_name, child)
            for child_name, child in module.named_children()
            if any(True for _ in child.parameters())
        ]
        classes = [type(child) for _, child in children]
        if any(classes.count(c) >= 2 for c in set(classes)):
            found.append((name, children))
    return found


def block_layers(model: nn.Module, managed: set[int] | None = None) -> list[Layer]:
    """Depth units as layers: each block of the model's repeated-block containers
    (:func:`block_containers`) is one, with every parameter under it; the parameters outside
    them form one unit per stretch of registration order between blocks (what sits before the
    first block, such as embeddings or a stem conv, and what sits after the last one, such as
    the final norm and the head). Without such containers, the layers of
    :func:`module_layers`."""
    blocks = [block for _, found in block_containers(model) for block in found]
    if not blocks:
        return module_layers(model, managed)
    units: list[dict] = []  # in registration order: {"block": (name, module) or None, ...}
    for module_name, module, params in _held_params(model, managed):
        current_block = next(
            ((name, block) for name, block in blocks
             if module_name == name or module_name.startswith(f"{name}.")),
            None,
        )  # fmt: skip
        if not units or units[-1]["block"] != current_block:
            units.append(dict(block=current_block, params=[], modules=[], embeddings=[]))
        unit = units[-1]
        unit["params"] += params
        unit["modules"].append((module_name or type(model).__name__, module))
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            unit["embeddings"] += [p for _, p in params]
    layers = []
    for index, unit in enumerate(units):
        if unit["block"] is not None:
            name, module = unit["block"]
        else:
            name = "+".join(n for n, _ in unit["modules"])
            module = unit["modules"][0][1] if len(unit["modules"]) == 1 else None
        layers.append(Layer(index, name, unit["params"], module, embeddings=unit["embeddings"]))
    return layers


def param_names(groups: list[dict]) -> dict[int, str]:
    """Each parameter's name for messages: its ``param_names`` entry, else
    ``param_groups[g][i]``."""
    names = {}
    for g_index, group in enumerate(groups):
        given = group.get("param_names", [None] * len(group["params"]))
        for p_index, (p, name) in enumerate(zip(group["params"], given)):
            names.setdefault(id(p), name or f"param_groups[{g_index}][{p_index}]")
    return names


def check_layer_keys(groups) -> None:
    """Either every group dict has an int ``"layer"`` or none does (before torch sees them)."""
    with_layer = ["layer" in g for g in groups]
    if any(with_layer) and not all(with_layer):
        raise ValueError("either every param group has a 'layer' index or none does")
    for g_index, group in enumerate(groups):
        key = group.get("layer", g_index)
        if not isinstance(key, int) or isinstance(key, bool):
            raise ValueError(f"param group {g_index}: 'layer' must be an int, got {key!r}")


def group_layers(groups: list[dict], names: dict[int, str]) -> list[Layer]:
    """Layers from param groups with ``"layer"`` keys: the groups sharing a key form one layer,
    ordered by the key."""
    keys = [group["layer"] for group in groups]
    positions = {key: position for position, key in enumerate(sorted(set(keys)))}
    layers = [Layer(position, f"layer {key}", key=key) for key, position in positions.items()]
    for group, key in zip(groups, keys):
        layers[positions[key]].params.extend((names[id(p)], p) for p in group["params"])
    return layers


# ----------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------


def param_role(layer: Layer, param: Tensor, is_last_layer: bool) -> str:
    """``embedding`` (an nn.Embedding's weight), ``head`` (a matrix of the last layer),
    ``matrix`` (any other parameter with 2+ dimensions) or ``vector`` (0-D and 1-D)."""
    if param.dim() < 2:
        return "vector"
    if isinstance(layer.module, (nn.Embedding, nn.EmbeddingBag)) or any(
        param is e for e in layer.embeddings
    ):
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
    groups: list[dict], partition: Partition, norms: dict[str, str], fallback: str
) -> dict[int, str]:
    """Each parameter's norm, ``id(p) -> norm``: its group's ``"norm"`` if not ``"auto"``,
    else its role's. Needs the final positions: the head is the last layer."""
    last = max(layer.position for layer in partition.layers)
    assigned = {}
    for group in groups:
        for p in group["params"]:
            if group["norm"] != "auto":
                assigned[id(p)] = group["norm"]
                continue
            layer = partition.layer_of[id(p)]
            role = param_role(layer, p, layer.position == last)
            assigned[id(p)] = resolve_norm(role, norms, fallback)
    return assigned
