"""Online per-layer smoothness estimates, which ``cost_optimal`` sampling draws from
(docs/method.md section 3).

The estimate of layer i is the secant between two consecutive steps where it was active,
``sum_p ||G_p' - G_p||_* / max_p ||X_p' - X_p||`` over the layer's matrix parameters p, smoothed
by an EMA with factor ``beta``. Every layer is measured on one scale whatever norm updates it:
each matrix parameter in the RMS->RMS operator norm of the map it is (the modular norm), a
weight of kernel shape (out, in) (conv kernels as (out, in*kh*kw)) by ``sqrt(in/out)*||W||_2``,
dual ``sqrt(out/in)*||G||_nuclear``, an embedding table (rows: tokens) as the map from tokens
to rows, ``sqrt(rows/dim)*||E||_2``. Vector parameters (biases, norm gains) ride along: they are
not measured, so a layer of vectors only (a LayerNorm) never has an estimate, and the sampler
takes it as 0 (it is updated exactly as often as the layer below it).

A layer's estimate is refreshed on every ``every``-th of its active steps: the step before is
measured (its length, and its gradients kept as ``prev_grad``), the next active step takes the
secant and frees ``prev_grad``. The EMA factor is ``beta ** every`` per estimate, so the
estimates remember as many active steps whatever ``every``.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import Tensor

from ..defaults import SMOOTHNESS_POWER_ITERATIONS
from ..kernels import ops
from ..update_rules import as_matrix, matrix_shape

# ActiveByLayer: position -> [(group, norm, param)], the step's active parameters with gradients.


def measured(p: Tensor) -> bool:
    """Whether the estimates measure ``p`` (matrices do; vectors ride along)."""
    return p.dim() >= 2


def _map_shape(p: Tensor, embedding: bool) -> tuple[int, int]:
    """(out, in) of the linear map ``p`` is: an embedding table maps its rows' index (one-hot
    over the rows) to a row."""
    rows, cols = matrix_shape(p.shape)
    return (cols, rows) if embedding else (rows, cols)


def dual_norm(t: Tensor, cuda_kernels: bool | None = None) -> float:
    """The nuclear norm of ``t`` as a matrix, <t, sharp(t)> by Newton-Schulz (spectral)."""
    _, dual = ops.sharp(
        as_matrix(t).float(),
        norm="spectral",
        ns_coefficients="polar_express",
        ns_steps=8,
        ns_precision="native",
        cuda_kernels=cuda_kernels,
    )
    return float(dual)


def primal_norm(t: Tensor) -> float:
    """The largest singular value of ``t`` as a matrix, by power iteration in float64."""
    m = as_matrix(t).double()
    if m.numel() == 0:
        return 0.0
    v = torch.ones(m.shape[1], dtype=m.dtype, device=m.device)
    v[::2] = -0.5  # not orthogonal to typical top singular vectors; deterministic
    sigma = 0.0
    for _ in range(SMOOTHNESS_POWER_ITERATIONS):
        u = m @ v
        v = m.T @ u
        sigma = math.sqrt(float(v.norm()))
        if sigma == 0.0:
            return 0.0
        v = v / v.norm()
    return sigma


def rms_dual_norm(t: Tensor, embedding: bool, cuda_kernels: bool | None = None) -> float:
    """The dual of the RMS->RMS operator norm: ``sqrt(out/in) * ||t||_nuclear``."""
    out, inp = _map_shape(t, embedding)
    return math.sqrt(out / inp) * dual_norm(t, cuda_kernels) if inp else 0.0


def rms_operator_norm(t: Tensor, embedding: bool) -> float:
    """The RMS->RMS operator norm of the map ``t`` is: ``sqrt(in/out) * ||t||_2``."""
    out, inp = _map_shape(t, embedding)
    return math.sqrt(inp / out) * primal_norm(t) if out else 0.0


class SmoothnessEstimator:
    """Per-layer estimates (``smoothness[i]``, None until layer i has one, and always for a
    layer without matrices) and, while a layer is armed for its next secant, the length of its
    last step (``last_step_norm``, None otherwise). Call :meth:`before_step` with the step's
    active parameters before updating them, :meth:`after_step` with its result after."""

    def __init__(
        self, num_layers: int, beta: float, cuda_kernels: bool | None = None, every: int = 1
    ) -> None:
        self.beta = beta
        self.every = every
        self.cuda_kernels = cuda_kernels
        self.smoothness: list[float | None] = [None] * num_layers
        self.last_step_norm: list[float | None] = [None] * num_layers

    def __setstate__(self, state) -> None:
        self.__dict__.update({"every": 1, **state})  # copies made before `every` existed

    def add_layers(self, count: int) -> None:
        """Room for ``count`` new layers (without estimates)."""
        self.smoothness += [None] * count
        self.last_step_norm += [None] * count

    def for_sampling(self, has_matrices: list[bool]) -> list[float] | None:
        """The estimates ``cost_optimal`` draws from (0 for the layers without matrices), or
        None while a layer with matrices has none yet (or no layer has matrices)."""
        if not any(has_matrices):
            return None
        values = []
        for value, measurable in zip(self.smoothness, has_matrices):
            if measurable and value is None:
                return None
            values.append(value if measurable else 0.0)
        return values

    def _armed(self, update_count: int) -> bool:
        """Whether this active step (the layer's ``update_count``-th, from 0) is measured for
        the secant its next active step takes."""
        return (update_count + 1) % self.every == 0

    def before_step(
        self, by_layer: dict, state, update_counts: list[int], embeddings: Collection[int]
    ) -> dict[int, Tensor]:
        """Takes the secant of the layers armed at their previous active step, then returns the
        values before the step of the parameters this step arms (``embeddings``: the ids of
        embedding tables), for :meth:`after_step`."""
        before = {}
        for layer, entries in by_layer.items():
            matrices = [p for _, _, p in entries if measured(p)]
            if self.last_step_norm[layer] is not None:
                self._secant(layer, matrices, state, embeddings)
            if matrices and self._armed(update_counts[layer]):
                before.update({id(p): p.detach().clone() for p in matrices})
        return before

    def _secant(self, layer: int, matrices: list[Tensor], state, embeddings) -> None:
        step_norm = self.last_step_norm[layer]
        self.last_step_norm[layer] = None
        previous = [state[p].get("prev_grad") for p in matrices]
        if self.every > 1:  # only the armed steps keep a gradient
            for p in matrices:
                state[p].pop("prev_grad", None)
        if not matrices or any(g is None for g in previous) or step_norm <= 0:
            return
        numerator = sum(
            rms_dual_norm(p.grad - g, id(p) in embeddings, self.cuda_kernels)
            for p, g in zip(matrices, previous)
        )
        estimate = numerator / step_norm
        old = self.smoothness[layer]
        beta = self.beta**self.every  # per active step: the same memory whatever `every`
        self.smoothness[layer] = estimate if old is None else beta * old + (1 - beta) * estimate

    def after_step(
        self, by_layer: dict, state, before: dict[int, Tensor], embeddings: Collection[int]
    ) -> None:
        """Records each armed layer's step length and keeps its gradients as ``prev_grad``."""
        for layer, entries in by_layer.items():
            matrices = [p for _, _, p in entries if id(p) in before]
            if not matrices:
                continue
            step_norm = 0.0
            for p in matrices:
                step = p.detach() - before[id(p)]
                step_norm = max(step_norm, rms_operator_norm(step, id(p) in embeddings))
                s = state[p]
                if "prev_grad" not in s:
                    s["prev_grad"] = torch.empty_like(p.grad)
                s["prev_grad"].copy_(p.grad)
            self.last_step_norm[layer] = step_norm
