"""Typed wrappers over the ``torch.ops.dropmuon.*`` operators, with their fake (meta)
implementations for ``torch.compile``, and the fallback to :mod:`dropmuon.kernels.reference` when
the compiled extension is missing or has no kernel for a tensor's device (warned once per reason).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ..defaults import DEFAULT_SHIFT_STRENGTH, GROUP_DEFAULTS
from ..defaults import MUON_COEFFICIENTS as MUON_COEFFICIENTS  # re-exported
from ..update_rules import UpdateArguments, ns_schedule
from . import reference

try:
    from .. import _C  # noqa: F401  (registers torch.ops.dropmuon.*)

    EXTENSION_ERROR: Exception | None = None
except ImportError as error:  # not built: the references stand in
    EXTENSION_ERROR = error


# --------------------------------------------------------------------------------------------
# Routing: compiled kernel when there is one, else the reference (warned once per reason)
# --------------------------------------------------------------------------------------------

_warned: set[str] = set()

# The custom CUDA kernels (csrc/cuda) compile but have not yet passed on real hardware. Until the
# commit that records such a run flips this, CUDA tensors take the pure-PyTorch reference (torch's
# own CUDA matrix products) unless the kernels are asked for: DropMuon(cuda_kernels=True), or
# DROPMUON_CUDA_KERNELS=1 in the environment (the option wins over the variable).
CUDA_KERNELS_VALIDATED = False
CUDA_KERNELS_ENV = "DROPMUON_CUDA_KERNELS"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"dropmuon: {message}", stacklevel=4)


def _warn_reference(reason: str) -> None:
    _warn_once(f"{reason}; using the pure-PyTorch reference (slower)")


@torch.compiler.assume_constant_result  # fixed per process; lets Dynamo trace the wrappers
def has_kernel(device_type: str) -> bool:
    """Whether the compiled extension has kernels for tensors on ``device_type``."""
    if EXTENSION_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "dropmuon::sharp", key
    )


def cuda_kernels_enabled(cuda_kernels: bool | None = None) -> bool:
    """Whether CUDA tensors use the custom kernels: ``cuda_kernels`` if given, else
    ``DROPMUON_CUDA_KERNELS`` (``1`` or ``0``), else the default (``CUDA_KERNELS_VALIDATED``)."""
    if cuda_kernels is not None:
        return bool(cuda_kernels)
    value = os.environ.get(CUDA_KERNELS_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{CUDA_KERNELS_ENV} must be 0 or 1, got {value!r}")
    return CUDA_KERNELS_VALIDATED if value == "" else value == "1"


def _extension_loaded() -> bool:
    """Whether the compiled extension is loaded; warns once (saying why) when it is not."""
    if EXTENSION_ERROR is None:
        return True
    _warn_reference(f"the compiled extension is not available ({EXTENSION_ERROR})")
    return False


def use_kernel(device_type: str, cuda_kernels: bool | None = None) -> bool:
    """Whether the wrappers call the compiled kernel (True) or the reference (False) for tensors
    on ``device_type``; warns once when the reference stands in. CUDA: see
    :func:`cuda_kernels_enabled`."""
    if not _extension_loaded():
        return False
    if device_type == "cuda" and not cuda_kernels_enabled(cuda_kernels):
        _warn_once(
            "the custom CUDA kernels are opt-in until they have passed on real hardware, so "
            "CUDA tensors use the pure-PyTorch reference (torch's own CUDA matrix products); "
            f"DropMuon(..., cuda_kernels=True) or {CUDA_KERNELS_ENV}=1 turns them on"
        )
        return False
    if has_kernel(device_type):
        return True
    _warn_reference(f"the compiled extension has no kernels for '{device_type}' tensors")
    return False


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------


def sharp(
    m: Tensor,
    norm: str = "spectral",
    ns_coefficients=GROUP_DEFAULTS["ns_coefficients"],
    ns_steps: int | None = GROUP_DEFAULTS["ns_steps"],
    eps: float = GROUP_DEFAULTS["eps"],
    ns_precision: str = "native",
    with_duals: bool = True,
    cuda_kernels: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """sharp(M) for a matrix [rows, cols] or a batch [B, rows, cols] (docs/method.md section 4).

    Returns ``(out, duals)``: ``out`` has M's shape and dtype, ``duals`` (float64, one per
    matrix) is <M, sharp(M)>, e.g. the nuclear norm for ``norm="spectral"``. Norms:
    ``"spectral"`` (Newton-Schulz), ``"sign"``, ``"column"``, ``"row"``, ``"frobenius"``.
    ``ns_precision="bfloat16"`` keeps the Newton-Schulz iterates in bfloat16 (float32
    accumulation), as torch.optim.Muon does; ``"native"`` keeps M's precision (float32 for
    bfloat16 input). ``with_duals=False`` skips the duals (an empty tensor comes back) and, for
    the spectral norm, the pass over the data they cost. ``cuda_kernels``: see
    :func:`use_kernel`.
    """
    single = m.dim() == 2
    batch = m.unsqueeze(0) if single else m
    schedule = ns_schedule(ns_coefficients, ns_steps)
    args = (
        batch,
        norm,
        list(schedule.coefficients),
        schedule.norm_scale,
        schedule.norm_offset,
        eps,
        ns_precision,
        with_duals,
    )
    if use_kernel(m.device.type, cuda_kernels):
        out, duals = torch.ops.dropmuon.sharp(*args)
    else:
        out, duals = reference.sharp(*args)
    if single:
        return out[0], duals[0] if with_duals else duals
    return out, duals


def muon_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    arguments: UpdateArguments,
    *,
    with_duals: bool = False,
    cuda_kernels: bool | None = None,
) -> Tensor:
    """One fused update of same-shape tensors in place (dm_update in dropmuon.h;
    docs/method.md section 1) with ``arguments`` (:meth:`UpdateArguments.of_group` builds them
    for a param group); ``cuda_kernels``: see :func:`use_kernel`.

    Returns the float64 duals <D, sharp(D)> of the update directions with ``with_duals``, an
    empty tensor otherwise.
    """
    kwargs = arguments.op_keywords(with_duals)
    device = params[0].device.type if params else "cpu"
    if use_kernel(device, cuda_kernels):
        return torch.ops.dropmuon.muon_update_(
            list(params), list(grads), list(momentum_buffers), **kwargs
        )
    return reference.muon_update_(list(params), list(grads), list(momentum_buffers), **kwargs)


def sampler_arguments(
    kind: str,
    probabilities: Sequence[float] | None = None,
    tau: int | None = None,
    progress: float = 0.0,
    shift_strength: float = DEFAULT_SHIFT_STRENGTH,
    smoothness: Sequence[float] | None = None,
) -> tuple:
    """The sampler operators' arguments after ``num_layers`` (and ``seed, step``), in their
    schema's order and types. ``probabilities``: ``custom``'s P(cutoff = i); ``tau``:
    ``tau_nice``'s layers per step; ``progress`` in [0, 1] and ``shift_strength``:
    ``epoch_shift``'s; ``smoothness``: ``cost_optimal``'s estimates, one per layer."""
    return (
        kind,
        [float(v) for v in (probabilities or ())],
        int(tau or 0),
        float(progress),
        float(shift_strength),
        [float(v) for v in (smoothness or ())],
    )


def sampler_distribution(num_layers: int, kind: str, **options) -> Tensor:
    """P(cutoff = i) for each layer i (float64), for a sampling kind (dm_sampler_distribution);
    ``options`` as :func:`sampler_arguments`' (docs/method.md section 2)."""
    args = (num_layers, *sampler_arguments(kind, **options))
    if _extension_loaded():  # the sampler has no device: one kernel for all
        return torch.ops.dropmuon.sampler_distribution(*args)
    return reference.sampler_distribution(*args)


def sample_layers(num_layers: int, seed: int, step: int, kind: str, **options) -> Tensor:
    """The bool mask of layers active at optimizer step ``step`` (dm_sample_layers);
    ``options`` as :func:`sampler_arguments`'.

    A pure function of its arguments: the same (seed, step) gives the same mask on every
    process, before and after a resume.
    """
    args = (num_layers, int(seed), int(step), *sampler_arguments(kind, **options))
    if _extension_loaded():
        return torch.ops.dropmuon.sample_layers(*args)
    return reference.sample_layers(*args)


# --------------------------------------------------------------------------------------------
# Fake implementations (shapes only) so that torch.compile and opcheck can trace the ops
# --------------------------------------------------------------------------------------------

if EXTENSION_ERROR is None:

    @torch.library.register_fake("dropmuon::sharp")
    def _sharp_fake(
        input, norm, ns_coefficients, norm_scale, norm_offset, eps, ns_precision, with_duals=True
    ):
        torch._check(input.dim() == 3, lambda: "dropmuon.sharp: input must be 3-D")
        batch = input.shape[0] if with_duals else 0
        return torch.empty_like(input), input.new_empty((batch,), dtype=torch.float64)

    @torch.library.register_fake("dropmuon::muon_update_")
    def _muon_update_fake(params, grads, momentum_buffers, with_duals=False, **kwargs):
        if not params:
            return torch.empty((0,), dtype=torch.float64)
        batch = len(params) if with_duals else 0
        return params[0].new_empty((batch,), dtype=torch.float64)

    @torch.library.register_fake("dropmuon::_muon_update_capturable_")
    def _muon_update_capturable_fake(
        params, grads, momentum_buffers, hyperparameters, status, with_duals=False, **kwargs
    ):
        if not params:
            return hyperparameters.new_empty((0,))
        batch = len(params) if with_duals else 0
        return params[0].new_empty((batch,), dtype=torch.float64)

    @torch.library.register_fake("dropmuon::sampler_distribution")
    def _sampler_distribution_fake(num_layers, *args):
        return torch.empty((num_layers,), dtype=torch.float64)

    @torch.library.register_fake("dropmuon::sample_layers")
    def _sample_layers_fake(num_layers, *args):
        return torch.empty((num_layers,), dtype=torch.bool)
