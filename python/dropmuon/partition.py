"""Splitting an ``nn.Module`` into ordered layers, and each parameter's default norm.

A layer is a module that directly holds trainable parameters (``named_parameters(recurse=False)``
that require grad, or that a DropMuon optimizer froze). A parameter held by several modules (a
tied embedding and output head) belongs to the first of them in registration order, and a module
left with no parameter of its own is no layer. Layers are ordered by when their ``forward``
first starts in the first forward pass (traced with forward pre-hooks), and by registration order
until that pass has run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# Parameters whose requires_grad a DropMuon optimizer turned off: still trainable for the next
# optimizer built on the same model, unlike parameters the user froze. Keyed by id with weak
# references (tensors compare elementwise, so they cannot sit in a WeakSet).
_frozen_by_dropmuon: dict[int, weakref.ref] = {}


def frozen_by_dropmuon(param: torch.Tensor) -> bool:
    ref = _frozen_by_dropmuon.get(id(param))
    return ref is not None and ref() is param


def set_trainable(param: torch.Tensor, active: bool) -> None:
    """requires_grad for a managed parameter, remembering that the freeze was ours."""
    param.requires_grad_(active)
    if active:
        _frozen_by_dropmuon.pop(id(param), None)
    elif not frozen_by_dropmuon(param):
        key = id(param)

        def forget(ref, key=key):
            if _frozen_by_dropmuon.get(key) is ref:
                del _frozen_by_dropmuon[key]

        _frozen_by_dropmuon[key] = weakref.ref(param, forget)


ROLES = ("matrix", "head", "embedding", "vector")
NORM_CHOICES = ("spectral", "sign", "column", "row", "frobenius", "adamw")
DEFAULT_ROLE_NORMS = {"matrix": "spectral", "head": "spectral", "embedding": "spectral"}


@dataclass
class Layer:
    """One layer of the partition: a module (or a param group) and the parameters it owns."""

    index: int
    name: str
    params: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    module: nn.Module | None = None


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


def param_role(layer: Layer, param: torch.Tensor, is_last_layer: bool) -> str:
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
    if fallback not in ("sign", "adamw"):
        raise ValueError(f"fallback must be 'sign' or 'adamw', got {fallback!r}")
    norms = dict(norms or {})
    for role, norm in norms.items():
        if role not in ROLES:
            raise ValueError(f"norms: unknown role {role!r}; roles are {', '.join(ROLES)}")
        if norm not in NORM_CHOICES:
            raise ValueError(
                f"norms[{role!r}]: unknown norm {norm!r}; use {', '.join(NORM_CHOICES)}"
            )
    return norms


class FirstForwardTrace:
    """Orders layers by the first forward pass. ``on_layer(layer, position)`` runs inside each
    layer's forward pre-hook when the layer is first reached, so the caller can set
    ``requires_grad`` for the draw of step 0 before the layer records any autograd graph."""

    def __init__(self, layers: list[Layer], on_layer: Callable[[Layer, int], None]) -> None:
        self.layers = layers
        self.positions: dict[int, int] = {}  # layer index -> position in the first forward
        self.on_layer = on_layer
        self.handles = [
            layer.module.register_forward_pre_hook(self._hook(layer))
            for layer in layers
            if layer.module is not None
        ]

    def _hook(self, layer: Layer):
        def hook(module, args):
            if layer.index not in self.positions:
                self.positions[layer.index] = len(self.positions)
                self.on_layer(layer, self.positions[layer.index])

        return hook

    @property
    def started(self) -> bool:
        return bool(self.positions)

    def finish(self) -> list[int]:
        """Removes the hooks; returns the layer indices in execution order (layers that never
        ran follow in registration order)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        ran = sorted(self.positions, key=self.positions.get)
        return ran + [layer.index for layer in self.layers if layer.index not in self.positions]
