"""Online per-layer smoothness estimates, which ``cost_optimal`` sampling draws from
(docs/method.md section 3).

The estimate of layer i is the secant between two consecutive steps where it was active,
``sum_p ||G_p' - G_p||_* / max_p ||X_p' - X_p||`` over the layer's parameters p, in the norm of
each parameter (dual norm by the sharp operator: the nuclear norm by Newton-Schulz for
spectral; primal spectral norm by power iteration), smoothed by an EMA with factor ``beta``.
The previous gradient is kept in the optimizer state as ``prev_grad``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..defaults import SMOOTHNESS_POWER_ITERATIONS
from ..kernels import ops
from ..update_rules import as_matrix

# ActiveByLayer: position -> [(group, norm, param)], the step's active parameters with gradients.


def _geometry(norm: str) -> str:
    """The norm whose dual and primal values the secant uses (AdamW: Euclidean)."""
    return "frobenius" if norm == "adamw" else norm


def dual_norm(t: Tensor, norm: str, cuda_kernels: bool | None = None) -> float:
    """||t||_* for ``norm``: <t, sharp(t)> (the nuclear norm for spectral, by Newton-Schulz)."""
    _, dual = ops.sharp(
        as_matrix(t).float(),
        norm=norm,
        ns_coefficients="polar_express",
        ns_steps=8,
        ns_precision="native",
        cuda_kernels=cuda_kernels,
    )
    return float(dual)


def primal_norm(t: Tensor, norm: str) -> float:
    """||t|| in ``norm`` (the largest singular value, by power iteration, for spectral)."""
    m = as_matrix(t).double()
    if m.numel() == 0:
        return 0.0
    if norm == "spectral":
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
    if norm == "sign":
        return float(m.abs().max())
    if norm == "column":
        return float(m.norm(dim=0).max())
    if norm == "row":
        return float(m.norm(dim=1).max())
    return float(m.norm())


class SmoothnessEstimator:
    """Per-layer estimates (``smoothness[i]``, None until layer i has one) and the length of
    each layer's last step (``last_step_norm``). Call :meth:`before_step` with the step's active
    parameters before updating them, :meth:`after_step` with its result after."""

    def __init__(self, num_layers: int, beta: float, cuda_kernels: bool | None = None) -> None:
        self.beta = beta
        self.cuda_kernels = cuda_kernels
        self.smoothness: list[float | None] = [None] * num_layers
        self.last_step_norm: list[float | None] = [None] * num_layers

    def add_layers(self, count: int) -> None:
        """Room for ``count`` new layers (without estimates)."""
        self.smoothness += [None] * count
        self.last_step_norm += [None] * count

    def before_step(self, by_layer: dict, state) -> dict[int, Tensor]:
        """Updates the estimates of the layers also active at their previous active step (the
        gradient change over that step's length); returns the parameters' values before the
        step, for :meth:`after_step`."""
        for layer, entries in by_layer.items():
            numerator, complete = 0.0, self.last_step_norm[layer] is not None
            for _, norm, p in entries:
                previous = state[p].get("prev_grad")
                if previous is None:
                    complete = False
                    continue
                numerator += dual_norm(p.grad - previous, _geometry(norm), self.cuda_kernels)
            if complete and self.last_step_norm[layer] > 0:
                estimate = numerator / self.last_step_norm[layer]
                old = self.smoothness[layer]
                self.smoothness[layer] = (
                    estimate if old is None else self.beta * old + (1 - self.beta) * estimate
                )
        return {id(p): p.detach().clone() for entries in by_layer.values() for _, _, p in entries}

    def after_step(self, by_layer: dict, state, before: dict[int, Tensor]) -> None:
        """Records each active layer's step length and keeps its gradients as ``prev_grad``."""
        for layer, entries in by_layer.items():
            step_norm = 0.0
            for _, norm, p in entries:
                step = primal_norm(p.detach() - before[id(p)], _geometry(norm))
                step_norm = max(step_norm, step)
                s = state[p]
                if "prev_grad" not in s:
                    s["prev_grad"] = torch.empty_like(p.grad)
                s["prev_grad"].copy_(p.grad)
            self.last_step_norm[layer] = step_norm
