"""The rules of the update that every path shares, each written once: how a tensor is seen as a
matrix, the Newton-Schulz schedule a group's options resolve to, the arguments of one fused
update (:class:`UpdateArguments`, built once per group and norm and passed unchanged down to
the operator call), the momentum direction and the step size. The fused kernels (csrc/core)
implement the same rules in C; the reference (:mod:`dropmuon.kernels.reference`), the FSDP2 owner
path (:mod:`dropmuon.distributed.fsdp`) and the describe and smoothness code call these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .defaults import (
    GROUP_DEFAULTS,
    MUON_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    POLAR_EXPRESS_NORM,
)

# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def matrix_shape(shape) -> tuple[int, int]:
    """The (rows, cols) matrix every kernel sees a tensor of this shape as: (size(0),
    numel / size(0)), as conv kernels (out, in*kh*kw); 0-D is 1 x 1, zero-size tensors included
    (dropmuon/aten/arguments.h's matrix_shape is the shim's twin)."""
    if len(shape) == 0:
        return 1, 1
    rows = shape[0]
    return rows, math.prod(shape) // rows if rows else 0


def as_matrix(t: Tensor) -> Tensor:
    """``t`` reshaped to its :func:`matrix_shape` (reshape cannot infer -1 for zero-size)."""
    return t.reshape(matrix_shape(t.shape))


# --------------------------------------------------------------------------------------------
# The Newton-Schulz schedule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewtonSchulzSchedule:
    """A resolved Newton-Schulz schedule: flat (a, b, c) triples and the input normalisation."""

    coefficients: tuple[float, ...]
    norm_scale: float = 1.0
    norm_offset: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.coefficients) // 3


def ns_schedule(
    ns_coefficients=GROUP_DEFAULTS["ns_coefficients"],
    ns_steps: int | None = GROUP_DEFAULTS["ns_steps"],
) -> NewtonSchulzSchedule:
    """Resolves the user's ``ns_coefficients`` / ``ns_steps`` into a schedule.

    ``ns_coefficients`` is ``"muon"`` or one (a, b, c) triple (repeated ``ns_steps`` times),
    ``"polar_express"`` (its 5 tuned triples; more steps repeat the last one, fewer take the
    first ``ns_steps``), or a sequence of triples, one per step (``ns_steps`` must then be None
    or match its length). A resolved schedule passes through as it is.
    """
    if isinstance(ns_coefficients, NewtonSchulzSchedule):
        return ns_coefficients
    if ns_steps is not None and (not isinstance(ns_steps, int) or ns_steps < 0):
        raise ValueError(f"ns_steps must be a non-negative int, got {ns_steps!r}")
    if isinstance(ns_coefficients, str):
        if ns_coefficients == "muon":
            return ns_schedule(MUON_COEFFICIENTS, ns_steps)
        if ns_coefficients == "polar_express":
            steps = len(POLAR_EXPRESS_COEFFICIENTS) if ns_steps is None else ns_steps
            triples = [POLAR_EXPRESS_COEFFICIENTS[min(j, 4)] for j in range(steps)]
            return NewtonSchulzSchedule(_flatten(triples), *POLAR_EXPRESS_NORM)
        raise ValueError(
            f"ns_coefficients must be 'muon', 'polar_express', a triple or a list of triples, "
            f"got {ns_coefficients!r}"
        )
    values = list(ns_coefficients)
    if len(values) == 3 and all(isinstance(v, (int, float)) for v in values):
        return NewtonSchulzSchedule(_flatten([values] * (5 if ns_steps is None else ns_steps)))
    # A short or long tuple of numbers is neither a triple nor a list of triples.
    if not values or any(not isinstance(t, (list, tuple)) or len(t) != 3 for t in values):
        raise ValueError(f"ns_coefficients must be a triple or a list of triples, got {values!r}")
    if ns_steps is not None and ns_steps != len(values):
        raise ValueError(
            f"ns_steps={ns_steps} does not match the {len(values)} triples in ns_coefficients"
        )
    return NewtonSchulzSchedule(_flatten(values))


def _flatten(triples) -> tuple[float, ...]:
    flat = tuple(float(v) for t in triples for v in t)
    if any(v != v or v in (float("inf"), float("-inf")) for v in flat):
        raise ValueError(f"ns_coefficients must be finite, got {flat}")
    return flat


# --------------------------------------------------------------------------------------------
# The arguments of one fused update
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateArguments:
    """Everything one fused update of same-shape parameters needs besides the tensors (dm_update
    in dropmuon.h; docs/method.md section 1): made once per param group and norm by
    :meth:`of_group`, passed unchanged from the optimizer through :mod:`dropmuon.kernels.ops` (which
    spells it out for the operator once, :meth:`op_keywords`) and to the FSDP2 owner path.
    Frozen and hashable: parameters whose arguments are equal share a call."""

    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    norm: str
    schedule: NewtonSchulzSchedule
    eps: float
    adjust_lr_fn: str  # "original", "match_rms_adamw" or "none" (already resolved)
    ns_precision: str = "native"
    radius: str = "fixed"
    L0: float = 1.0
    L1: float = 0.0

    @classmethod
    def of_group(cls, group: dict, norm: str, schedule: NewtonSchulzSchedule) -> UpdateArguments:
        """The arguments for the parameters of ``group`` on ``norm`` (any norm but
        ``"adamw"``), with the group's resolved Newton-Schulz ``schedule``. The lr adjustment
        (``adjust_lr_fn``) applies to spectral updates only; other norms use lr as is."""
        adjust = group["adjust_lr_fn"] or "original"
        return cls(
            lr=float(group["lr"]),
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            norm=norm,
            schedule=schedule,
            eps=group["eps"],
            adjust_lr_fn=adjust if norm == "spectral" else "none",
            ns_precision=group["ns_precision"],
            radius=group["radius"],
            L0=group["L0"],
            L1=group["L1"],
        )

    def op_keywords(self, with_duals: bool = False) -> dict:
        """The keyword arguments of ``torch.ops.dropmuon.muon_update_`` and of
        ``reference.muon_update_`` (the operator schema's names and types, the schedule spelled
        out)."""
        return dict(
            lr=float(self.lr),
            weight_decay=float(self.weight_decay),
            momentum=float(self.momentum),
            nesterov=bool(self.nesterov),
            norm=self.norm,
            ns_coefficients=list(self.schedule.coefficients),
            norm_scale=self.schedule.norm_scale,
            norm_offset=self.schedule.norm_offset,
            eps=float(self.eps),
            ns_precision=self.ns_precision,
            adjust_lr_fn=self.adjust_lr_fn,
            radius=self.radius,
            L0=float(self.L0),
            L1=float(self.L1),
            with_duals=bool(with_duals),
        )


# --------------------------------------------------------------------------------------------
# Momentum direction and step size
# --------------------------------------------------------------------------------------------


def direction(grad: Tensor, buf: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """The direction D from the gradient and the momentum buffer already advanced by it
    (``buf = lerp(buf, grad, 1 - momentum)``): ``lerp(grad, buf, momentum)`` with Nesterov,
    else the buffer itself (the same tensor: copy it before changing either)."""
    return grad.lerp(buf, momentum) if nesterov else buf


def lr_ratio(adjust_lr_fn: str, rows: int, cols: int) -> float:
    """The shape-dependent factor of torch.optim.Muon's ``_adjust_lr``."""
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def step_size(
    lr: float,
    adjust_lr_fn: str,
    rows: int,
    cols: int,
    radius: str,
    dual: float | None,
    L0: float,
    L1: float,
) -> float:
    """The step t of one (rows x cols) parameter: lr scaled for its shape (``radius="fixed"``)
    or the adaptive radius from its dual ``<D, sharp(D)>`` (docs/method.md section 4)."""
    if radius == "adaptive":
        # A zero direction moves nothing, also when L0 = 0 (no 0 / 0), as in the C core.
        return lr * dual / (L0 + L1 * dual) if dual > 0 else 0.0
    return lr * lr_ratio(adjust_lr_fn, rows, cols)
