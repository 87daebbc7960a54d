"""The order of the first forward: which layer each parameter use or module call places, and
the final positions it gives (:class:`FirstForwardTrace`), seen through a torch function mode
(:class:`ParamUse`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..dtensors import is_dtensor
from .partition import Layer


class FirstForwardTrace:
    """Orders layers by where the first forward pass in grad mode uses their parameters (in
    evaluation torch may take fused paths that read a block's parameters in one call), and
    tells the
    caller as each layer is placed, so that it can freeze the layer for step 0 before the
    layer records any autograd graph. Two kinds of events place a layer, the first time:

    - :meth:`used`: a torch function the forward calls reads one of its parameters (seen by
      :class:`ParamUse`, a torch function mode). This places what a parent reads functionally
      (nn.MultiheadAttention's ``out_proj``, whose module is never called; a weight passed to
      ``F.conv2d``) where it is read, and a tied weight where it is first read.
    - :meth:`reached`: its module is called. Only for layers whose parameters a function mode
      cannot see: FSDP2 swaps its sharded DTensor parameters for unsharded copies while the
      module runs.

    Layers placed by neither come first, in registration order (:attr:`unused` names them)."""

    def __init__(
        self, layers: list[Layer], model: nn.Module | None, positions: dict[int, int] | None = None
    ) -> None:
        self.layers = layers
        self.model = model
        self.by_param = {id(p): layer for layer in layers for _, p in layer.params}
        # FSDP2 layers: placed by the call of a module that holds one of their parameters (a
        # depth unit's modules all place it).
        self.by_module = {
            id(layer.module): layer
            for layer in layers
            if layer.module is not None and any(is_dtensor(p) for _, p in layer.params)
        }
        for module in model.modules() if model is not None else ():
            for p in module.parameters(recurse=False):
                layer = self.by_param.get(id(p))
                if layer is not None and is_dtensor(p):
                    self.by_module.setdefault(id(module), layer)
        # construction index -> position in the forward
        self.positions: dict[int, int] = dict(positions or {})
        self.unused: list[str] = []  # the layers no event placed (set by finish)

    def _place(self, layer: Layer | None) -> tuple[Layer, int] | None:
        if layer is None or layer.construction_index in self.positions:
            return None
        position = len(self.positions)
        self.positions[layer.construction_index] = position
        return layer, position

    def used(self, tensor) -> tuple[Layer, int] | None:
        """The layer of parameter ``tensor`` and its new position, if this is its first use."""
        return self._place(self.by_param.get(id(tensor)))

    def reached(self, module) -> tuple[Layer, int] | None:
        """The layer of ``module`` and its new position, if this is its first call and its
        layer is placed by calls (see the class docstring)."""
        return self._place(self.by_module.get(id(module)))

    def params_at(self, mask: list[bool], active: bool) -> list[Tensor]:
        """The parameters of the layers already placed whose position ``mask`` marks
        ``active``."""
        return [
            p
            for index, position in self.positions.items()
            if mask[position] == active
            for _, p in self.layers[index].params
        ]

    def finish(self, mask: list[bool]) -> list[bool]:
        """Sets every layer's position: the layers never placed first, in registration order
        (nothing in the forward depends on them, so they cost nothing to keep active, and the
        head stays last), then the order of placement. Returns ``mask`` (by placement, as the
        forward froze it) by the final positions, the layers never placed inactive: they were
        not used, so they have no gradient to apply. With nothing placed (no forward seen:
        gradients set by hand) the registration order and ``mask`` stand."""
        if not self.positions:
            return list(mask)
        placed = sorted(self.positions, key=self.positions.get)
        never = [layer.construction_index for layer in self.unplaced()]
        self.unused = [self.layers[index].name for index in never]
        final = [False] * len(never) + [mask[self.positions[index]] for index in placed]
        for position, index in enumerate(never + placed):
            self.layers[index].position = position
        return final

    def unplaced(self) -> list[Layer]:
        """The layers no event has placed yet, in registration order."""
        return [layer for layer in self.layers if layer.construction_index not in self.positions]

    def nothing_active(self, mask: list[bool]) -> bool:
        """Whether the forward so far used layers but only ones ``mask`` leaves out while some
        layers were never used: the drawn cutoff lies above every layer the forward reached."""
        return (
            bool(self.positions)
            and len(self.positions) < len(self.layers)
            and not any(mask[position] for position in self.positions.values())
        )


class ParamUse(TorchFunctionMode):
    """A torch function mode that calls ``on_use(tensor)`` for every tensor argument (or tensor
    in a list, tuple or dict argument) of each torch function the code under it calls, before
    the function runs. Only the outermost calls are seen: a function's own inner calls run
    with the mode off, which is what placement needs (the first call that reads a parameter)."""

    def __init__(self, on_use: Callable[[Tensor], None]) -> None:
        super().__init__()
        self.on_use = on_use

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("__get__", "__set__"):
            # A tensor property read (p.dtype, p.shape: HF's model.dtype reads the first
            # parameter's) is no use of the parameter in the computation.
            return func(*args, **kwargs)
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor):
                self.on_use(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, Tensor):
                        self.on_use(item)
            elif isinstance(value, dict):
                for item in value.values():
                    if isinstance(item, Tensor):
                        self.on_use(item)
        return func(*args, **kwargs)
