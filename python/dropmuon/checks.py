"""Argument checks, with torch.optim.Muon's messages where the argument is torch's.

Everything here raises before anything is modified: at construction for the options and the
parameters, at each step for the groups (a scheduler or the user may have written a bad value
since) and the gradients.
"""

from __future__ import annotations

import difflib
import math

import torch
from torch import Tensor

from .defaults import (
    ADJUST_LR_FNS,
    GROUP_DEFAULTS,
    LAYERINGS,
    NONFINITE_MODES,
    NORMS,
    NS_PRECISIONS,
    RADII,
)
from .dtensors import local_tensor
from .update_rules import NewtonSchulzSchedule, ns_schedule

# The dtypes of the C kernels (spectral, sign, column, row, frobenius); AdamW takes any float.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def check_hyperparameters(
    lr,
    weight_decay,
    momentum,
    eps,
    adjust_lr_fn,
    ns_precision,
    radius,
    L0,
    L1,
    adamw_betas,
    adamw_eps,
) -> None:
    """torch.optim.Muon's checks and messages for the shared arguments, then ours. Infinite
    values, which torch lets through, are rejected too: the kernels refuse them, and an error at
    construction beats one in the middle of a step."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    if not math.isfinite(lr):
        raise ValueError(f"Learning rate should be finite but is: {lr}")
    if not 0.0 <= momentum:
        raise ValueError(f"momentum should be >= 0 but is: {momentum}")
    if not momentum <= 1.0:
        raise ValueError(f"momentum should be <= 1 but is: {momentum}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
    if not math.isfinite(weight_decay):
        raise ValueError(f"weight decay should be finite but is: {weight_decay}")
    if adjust_lr_fn is not None and adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
    if not 0.0 <= eps or not math.isfinite(eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if ns_precision not in NS_PRECISIONS:
        raise ValueError(f"ns_precision must be 'native' or 'bfloat16', got {ns_precision!r}")
    if radius not in RADII:
        raise ValueError(f"radius must be 'fixed' or 'adaptive', got {radius!r}")
    if not (0.0 <= L0 < math.inf and 0.0 <= L1 < math.inf and L0 + L1 > 0):
        raise ValueError(
            f"L0 and L1 must be finite and >= 0 with L0 + L1 > 0, got L0={L0}, L1={L1}"
        )
    if len(adamw_betas) != 2:
        raise ValueError(f"adamw_betas must be a pair (beta1, beta2), got {adamw_betas!r}")
    beta1, beta2 = adamw_betas
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= adamw_eps or not math.isfinite(adamw_eps):
        raise ValueError(f"Invalid epsilon value: {adamw_eps}")


def check_optimizer_options(
    nonfinite, smoothness_beta, adamw_lr, lr, cuda_kernels, layers="modules", smoothness_every=1
) -> None:
    """The options of DropMuon that are not per group."""
    if layers not in LAYERINGS:
        raise ValueError(f"layers must be one of {LAYERINGS}, got {layers!r}")
    if cuda_kernels not in (None, True, False):
        raise ValueError(f"cuda_kernels must be None, True or False, got {cuda_kernels!r}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    if not 0.0 <= smoothness_beta < 1.0:
        raise ValueError(f"smoothness_beta must be in [0, 1), got {smoothness_beta!r}")
    if isinstance(smoothness_every, bool) or not isinstance(smoothness_every, int):
        raise TypeError(f"smoothness_every must be an int, got {smoothness_every!r}")
    if smoothness_every < 1:
        raise ValueError(f"smoothness_every must be >= 1, got {smoothness_every}")
    if adamw_lr is not None and not 0.0 <= adamw_lr < math.inf:
        raise ValueError(f"Invalid learning rate: {adamw_lr}")
    if adamw_lr is not None and float(lr) == 0.0 and adamw_lr != 0.0:
        raise ValueError("adamw_lr is kept as a ratio to lr, which needs lr > 0")


def adamw_lr_ratio(adamw_lr, lr) -> float:
    """``adamw_lr`` as the ratio to ``lr`` that the param groups keep (1 when not given)."""
    return 1.0 if adamw_lr is None else adamw_lr / float(lr)


def check_no_duplicates(group: dict, g_index: int) -> None:
    """torch.optim only warns about a repeated parameter; DropMuon would update it twice."""
    if len({id(p) for p in group["params"]}) != len(group["params"]):
        raise ValueError(
            f"optimizer contains a parameter group with duplicate parameters (param group "
            f"{g_index}); DropMuon would update them twice per step"
        )


# The keys DropMuon reads in a param group, besides its hyperparameters (GROUP_DEFAULTS).
GROUP_KEYS = ("params", "param_names", "layer", *GROUP_DEFAULTS)
# Keys torch's LR schedulers write into param groups (a checkpoint's groups carry them).
SCHEDULER_KEYS = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")
# DropMuon's arguments whose group key has another name.
GROUP_NAMES = {"adamw_betas": "betas", "adamw_lr": "adamw_lr_ratio"}
# DropMuon's arguments that are the optimizer's, not a group's.
OPTIMIZER_ONLY = (
    "sampling", "tau", "seed", "total_steps", "shift_strength", "fallback", "norms",
    "nonfinite", "estimate_smoothness", "smoothness_beta", "smoothness_every", "cuda_kernels",
    "fsdp_update", "layers",
)  # fmt: skip
# Every key a near miss is checked against.
KNOWN_KEYS = (*GROUP_KEYS, *GROUP_NAMES, *OPTIMIZER_ONLY)


def check_group_keys(group: dict, g_index: int) -> None:
    """torch.optim keeps any key a param group brings (a scheduler's, the user's own label),
    and so does DropMuon; a key that is a near miss of one DropMuon reads ("momentun",
    "layer_") is an error, since the option it meant would silently keep its default."""
    if group.get("use_muon") is False:  # Keller Jordan's MuonWithAuxAdam groups
        raise ValueError(
            f"param group {g_index} has use_muon=False: DropMuon gives each parameter its update "
            "by role (vectors, embeddings and the head go to fallback='adamw' by default); to "
            "put this group on AdamW say so with 'norm': 'adamw'"
        )
    for key in group:
        if key in GROUP_KEYS or key in SCHEDULER_KEYS or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.8)
        meant = key if key in KNOWN_KEYS else (close[0] if close else None)
        if meant is None:
            continue  # kept, as torch.optim keeps any key
        where = f"param group {g_index} has the key {key!r}, which DropMuon does not read"
        if meant in OPTIMIZER_ONLY:
            group_key = difflib.get_close_matches(key, GROUP_KEYS, n=1, cutoff=0.8)
            raise ValueError(
                f"{where}: {meant!r} is an option of the whole optimizer "
                f"(DropMuon(..., {meant}=...)), not of a param group"
                + (f"; did you mean {group_key[0]!r}?" if group_key else "")
            )
        if meant in GROUP_NAMES:
            raise ValueError(
                f"{where}: in a param group DropMuon's {meant!r} is {GROUP_NAMES[meant]!r}"
                + (" (AdamW's lr as a ratio to the group's lr)" if meant == "adamw_lr" else "")
            )
        raise ValueError(
            f"{where}: did you mean {meant!r}? (other unknown keys are kept, as torch.optim "
            "keeps them)"
        )


def check_group(group) -> NewtonSchulzSchedule:
    """A group's hyperparameters (a group may override the defaults), checked at construction and
    again at each step; returns its resolved Newton-Schulz schedule."""
    check_hyperparameters(
        group["lr"],
        group["weight_decay"],
        group["momentum"],
        group["eps"],
        group["adjust_lr_fn"],
        group["ns_precision"],
        group["radius"],
        group["L0"],
        group["L1"],
        group["betas"],
        group["adamw_eps"],
    )
    return ns_schedule(group["ns_coefficients"], group["ns_steps"])


def check_group_norm(group) -> None:
    """A group's ``"norm"``: ``"auto"`` or one of the norms (checked at construction)."""
    if group["norm"] != "auto" and group["norm"] not in NORMS:
        raise ValueError(
            f"a param group's 'norm' is {group['norm']!r}: use 'auto' (each parameter's norm "
            f"from its role) or one of {', '.join(NORMS)}"
        )


def check_param(p: Tensor, name: str, norm: str) -> None:
    """Rejects, at construction, a parameter no norm can update (see DropMuon's docstring)."""
    if torch.is_complex(p):
        raise ValueError(
            f"DropMuon does not support complex parameters ({name}, {p.dtype}): keep "
            "it out of the optimizer (requires_grad=False, or leave it out of the "
            "param groups) or store it as torch.view_as_real"
        )
    if p.layout != torch.strided:
        raise ValueError(f"DropMuon does not support {p.layout} parameters ({name})")
    if norm != "adamw" and p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"DropMuon's {norm} update supports float32, float64 and bfloat16 "
            f"parameters; {name} is {p.dtype} (cast the model, or put it on "
            "fallback='adamw' if it is a vector)"
        )


def check_grad(p: Tensor, name: str) -> None:
    """A gradient the update can use, checked before anything is modified."""
    if p.grad.is_sparse:
        raise RuntimeError(
            f"DropMuon does not support sparse gradients ({name}); use a dense embedding "
            "(sparse=False) or put that parameter on another optimizer"
        )
    if p.grad.shape != p.shape or p.grad.dtype != p.dtype or p.grad.device != p.device:
        raise RuntimeError(
            f"the gradient of {name} is {p.grad.dtype} {tuple(p.grad.shape)} on {p.grad.device}, "
            f"the parameter {p.dtype} {tuple(p.shape)} on {p.device}: they must match"
        )


def nonfinite_layers(by_layer: dict[int, list], layers, sharded=None) -> dict[int, str]:
    """The layers whose gradients hold a NaN or Inf, each with the name of its first such
    parameter (``by_layer``: position -> [(group, norm, param)]; ``layers``: the optimizer's
    :class:`~dropmuon.layers.book.LayerBook`); one device sync for all. DTensor gradients are
    read on their local shards; with FSDP2 (``sharded``, the optimizer's sharded update) this
    rank's flags become the flags of all ranks, so that every rank decides the same."""
    entries = [(layer, p) for layer, items in by_layer.items() for _, _, p in items]
    if not entries:
        return {}
    grads = [local_tensor(p.grad) for _, p in entries]
    # A sum is NaN/Inf when an element is, and costs a fraction of isfinite().all(); it can
    # also overflow on finite values, so a non-finite sum is confirmed element by element.
    sums = torch.stack([g.sum(dtype=torch.float32).cpu() for g in grads]).tolist()
    flags = [
        not math.isfinite(total) and not bool(torch.isfinite(g).all())
        for g, total in zip(grads, sums)
    ]
    if sharded is not None:
        flags = sharded.any_rank(flags)
    bad: dict[int, str] = {}
    for (layer, p), flag in zip(entries, flags):
        if flag:
            bad.setdefault(layer, layers.name(p))
    return bad


def screen_nonfinite(by_layer: dict[int, list], layers, sharded, mode: str) -> dict[int, list]:
    """Raises on a NaN/Inf gradient before anything is modified (``mode="raise"``), or leaves
    its layer out of the step and counts it in ``layers.skipped_nonfinite`` (``"skip"``)."""
    bad_layers = nonfinite_layers(by_layer, layers, sharded)
    for layer, name in bad_layers.items():
        if mode == "raise":
            raise RuntimeError(
                f"DropMuon: non-finite gradient in parameter '{name}' (layer {layer}, "
                f"{layers.layer_names()[layer]}); nothing was updated. Pass nonfinite='skip' "
                "to skip such layers instead."
            )
        layers.skipped_nonfinite[layer] += 1
    return {layer: items for layer, items in by_layer.items() if layer not in bad_layers}


def check_estimate_option(estimate_smoothness: bool | None, sampler) -> bool:
    """Whether to keep smoothness estimates: ``estimate_smoothness``, by default on exactly for
    ``cost_optimal`` sampling (which refuses to go without)."""
    cost_optimal = getattr(sampler, "kind", None) == "cost_optimal"
    if estimate_smoothness is False and cost_optimal:
        raise ValueError("sampling='cost_optimal' needs estimate_smoothness")
    return cost_optimal if estimate_smoothness is None else bool(estimate_smoothness)
