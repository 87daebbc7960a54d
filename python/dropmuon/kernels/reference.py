"""Pure-PyTorch references of every dropmuon operator: the oracle.

They define what the C/CUDA kernels compute (tests compare the two), and they run when the
extension is not built or has no kernel for a device (``dropmuon.ops`` warns once). They favour
being obviously right over being fast. The rules every path shares (a tensor's matrix shape,
the step size, the momentum direction) live in :mod:`dropmuon.update_rules`; nothing in the
package imports its helpers from here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..defaults import (
    KERNEL_NORMS,
    LR_ADJUSTS,
    NS_PRECISIONS,
    PROBABILITY_TOLERANCE,
    RADII,
)
from ..update_rules import as_matrix, direction, step_size

# --------------------------------------------------------------------------------------------
# Sharp operators
# --------------------------------------------------------------------------------------------


def newton_schulz(
    m: Tensor,
    coefficients: list[float],
    norm_scale: float,
    norm_offset: float,
    eps: float,
    ns_precision: str = "native",
) -> Tensor:
    """Newton-Schulz on a batch [B, rows, cols] (docs/method.md section 4), in
    torch.optim.Muon's order of operations; the iterates stay in m's dtype, or bfloat16 for
    ``ns_precision="bfloat16"``."""
    if ns_precision not in NS_PRECISIONS:
        raise RuntimeError(f"dropmuon: unknown ns_precision '{ns_precision}'")
    x = m
    transposed = m.shape[-2] > m.shape[-1]
    if transposed:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=torch.float64)
    divisor = (norm * norm_scale + norm_offset).clamp(min=eps)
    inverse = torch.where(divisor > 0, 1.0 / divisor, torch.zeros_like(divisor))
    x = x * inverse.to(x.dtype)
    if ns_precision == "bfloat16":
        x = x.bfloat16()
    for j in range(len(coefficients) // 3):
        a, b, c = coefficients[3 * j : 3 * j + 3]
        gram = x @ x.mT
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, polynomial, x, beta=a)
    return x.mT if transposed else x


def sharp(
    m: Tensor,
    norm: str,
    ns_coefficients: list[float],
    norm_scale: float,
    norm_offset: float,
    eps: float,
    ns_precision: str = "native",
    with_duals: bool = True,
) -> tuple[Tensor, Tensor]:
    """Reference of ``torch.ops.dropmuon.sharp``: (sharp(M), float64 duals <M, sharp(M)>; an
    empty tensor without ``with_duals``)."""
    if m.dim() != 3:
        raise RuntimeError(
            f"dropmuon.sharp: input must be [batch, rows, cols], got {tuple(m.shape)}"
        )
    if norm not in KERNEL_NORMS:
        raise RuntimeError(f"dropmuon: unknown norm '{norm}'")
    if len(ns_coefficients) % 3:
        raise RuntimeError("dropmuon: ns_coefficients must hold whole (a, b, c) triples")
    compute = torch.float64 if m.dtype == torch.float64 else torch.float32
    x = m.to(compute)
    if not bool(torch.isfinite(x).all()):
        raise RuntimeError("dm_sharp failed: DM_ERR_NONFINITE: NaN or Inf in the input")

    def unit(v: Tensor, dims) -> Tensor:
        n = torch.linalg.vector_norm(v, dim=dims, keepdim=True, dtype=torch.float64)
        return v * torch.where(n.clamp(min=eps) > 0, 1.0 / n.clamp(min=eps), 0.0).to(compute)

    if norm == "spectral":
        coefficients = list(ns_coefficients)
        out = newton_schulz(x, coefficients, norm_scale, norm_offset, eps, ns_precision).to(compute)
    elif norm == "sign":
        out = torch.sign(x)
    elif norm == "column":
        out = unit(x, (-2,))
    elif norm == "row":
        out = unit(x, (-1,))
    else:
        out = unit(x, (-2, -1))
    duals = (x.double() * out.double()).sum(dim=(-2, -1))
    return out.to(m.dtype), duals if with_duals else duals[:0]


# --------------------------------------------------------------------------------------------
# Fused update
# --------------------------------------------------------------------------------------------


def muon_update_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    norm: str,
    ns_coefficients: list[float],
    norm_scale: float,
    norm_offset: float,
    eps: float,
    ns_precision: str,
    adjust_lr_fn: str,
    radius: str,
    L0: float,
    L1: float,
    with_duals: bool = False,
) -> Tensor:
    """Reference of ``torch.ops.dropmuon.muon_update_`` (see dm_update in dropmuon.h)."""
    if adjust_lr_fn not in LR_ADJUSTS:
        raise RuntimeError(f"dropmuon: unknown adjust_lr_fn '{adjust_lr_fn}'")
    if radius not in RADII:
        raise RuntimeError(f"dropmuon: unknown radius '{radius}'")
    directions = []
    for g, buf in zip(grads, momentum_buffers):
        directions.append(direction(g, buf.lerp(g, 1 - momentum), momentum, nesterov))
    if not directions:
        return torch.empty(0, dtype=torch.float64)
    batch = torch.stack([as_matrix(d) for d in directions])
    # sharp() rejects NaN/Inf before anything below touches the caller's tensors.
    updates, duals = sharp(batch, norm, ns_coefficients, norm_scale, norm_offset, eps, ns_precision)
    for g, buf in zip(grads, momentum_buffers):
        buf.lerp_(g, 1 - momentum)
    for i, p in enumerate(params):
        rows, cols = as_matrix(p).shape
        step = step_size(lr, adjust_lr_fn, rows, cols, radius, float(duals[i]), L0, L1)
        p.mul_(1 - lr * weight_decay)
        p.add_(updates[i].reshape(p.shape), alpha=-step)
    return duals if with_duals else duals[:0]


# --------------------------------------------------------------------------------------------
# Sampler: Philox4x32-10 and the cutoff distributions (mirrors csrc/core/sampler.c)
# --------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> list[int]:
    """Philox4x32-10 (Salmon et al., SC'11) on four 32-bit counter words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(10):
        if round_index:
            k0 = (k0 + 0x9E3779B9) & _MASK32
            k1 = (k1 + 0xBB67AE85) & _MASK32
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (
            (p1 >> 32) ^ c1 ^ k0,
            p1 & _MASK32,
            (p0 >> 32) ^ c3 ^ k1,
            p0 & _MASK32,
        )
    return [c0, c1, c2, c3]


def random_uniform(seed: int, step: int, index: int) -> float:
    """The sampler's uniform draw in [0, 1) (dm_random_uniform in dropmuon.h)."""
    seed &= (1 << 64) - 1
    words = philox4x32_10(
        (step & _MASK32, (step >> 32) & _MASK32, index & _MASK32, (index >> 32) & _MASK32),
        (seed & _MASK32, seed >> 32),
    )
    return (((words[0] << 32) | words[1]) >> 11) * 2.0**-53


def sampler_distribution(
    num_layers: int,
    kind: str,
    probabilities: list[float],
    tau: int,
    progress: float,
    shift_strength: float,
    smoothness: list[float],
) -> Tensor:
    """Reference of ``torch.ops.dropmuon.sampler_distribution``: P(cutoff = i), float64."""
    n = num_layers
    if n < 1:
        raise RuntimeError(f"dropmuon: num_layers must be >= 1, got {n}")
    if kind == "full":
        p = [1.0] + [0.0] * (n - 1)
    elif kind == "uniform":
        p = [1.0 / n] * n
    elif kind == "custom":
        if len(probabilities) != n:
            raise RuntimeError("dropmuon: custom sampling needs one probability per layer")
        bad = any(not math.isfinite(v) or v < 0 for v in probabilities)
        if bad or abs(sum(probabilities) - 1.0) > PROBABILITY_TOLERANCE:
            raise RuntimeError("DM_ERR_PROBABILITY: probabilities must be finite, >= 0, sum to 1")
        p = list(probabilities)
    elif kind == "tau_nice":
        if not 1 <= tau <= n:
            raise RuntimeError(f"dropmuon: tau must be in [1, {n}], got {tau}")
        at_least = [math.comb(n - i, tau) / math.comb(n, tau) for i in range(n + 1)]
        p = [at_least[i] - at_least[i + 1] for i in range(n)]
    elif kind == "epoch_shift":
        if not 0.0 <= progress <= 1.0 or not math.isfinite(shift_strength) or shift_strength < 0:
            raise RuntimeError("dropmuon: epoch_shift needs progress in [0, 1], strength >= 0")
        # Relative to the largest weight (x = 1 when tilt > 0, except for one layer: x = 0).
        tilt = shift_strength * (2.0 * progress - 1.0)
        x = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        top = tilt * max(x) if tilt > 0 else 0.0
        w = [math.exp(tilt * xi - top) for xi in x]
        p = [v / sum(w) for v in w]
    elif kind == "cost_optimal":
        if len(smoothness) != n:
            raise RuntimeError("dropmuon: cost_optimal needs one smoothness estimate per layer")
        if any(not math.isfinite(v) or v < 0 for v in smoothness) or max(smoothness) <= 0:
            raise RuntimeError("dropmuon: smoothness estimates must be finite, >= 0, max > 0")
        running, previous, p = 0.0, 0.0, []
        for v in smoothness:
            running = max(running, v)
            p.append((running - previous) / max(smoothness))
            previous = running
    else:
        raise RuntimeError(f"dropmuon: unknown sampling '{kind}'")
    return torch.tensor(p, dtype=torch.float64)


def sample_layers(num_layers: int, seed: int, step: int, kind: str, *options) -> Tensor:
    """Reference of ``torch.ops.dropmuon.sample_layers``: the bool active mask of a step.
    ``options`` are :func:`sampler_distribution`'s after ``kind``, in the schema's order:
    probabilities, tau, progress, shift_strength, smoothness."""
    p = sampler_distribution(num_layers, kind, *options).tolist()
    tau = options[1]
    if step < 0:
        raise RuntimeError(f"dropmuon: step must be >= 0, got {step}")
    if kind == "tau_nice":
        mask, needed = [], tau
        for i in range(num_layers):
            take = needed > 0 and (num_layers - i) * random_uniform(seed, step, i) < needed
            needed -= take
            mask.append(take)
        return torch.tensor(mask, dtype=torch.bool)
    u = 0.0 if kind == "full" else random_uniform(seed, step, 0)
    cumulative, cutoff = 0.0, None
    for i, pi in enumerate(p):
        cumulative += pi
        if pi > 0 and u < cumulative:
            cutoff = i
            break
    if cutoff is None:  # rounding left the total a hair under u
        cutoff = max(i for i, pi in enumerate(p) if pi > 0)
    return torch.arange(num_layers) >= cutoff
