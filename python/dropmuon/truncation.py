"""Truncation: the layers below the cutoff stop requiring grad, so the backward stops there.

Autograd records no graph for a computation whose inputs do not require grad. With the
parameters of the frozen layers not requiring grad (and the model input not requiring it), the
first layer that records anything is the cutoff layer: the backward pass computes no input- or
weight-gradient below it and saves no activations there (docs/method.md section 7). DropMuon
applies the mask of the coming step with :func:`apply_mask` after every step (its step
post-hook), and during the first forward pass layer by layer as each is reached.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

# Parameters whose requires_grad a DropMuon optimizer turned off: still trainable for the next
# optimizer built on the same model, unlike parameters the user froze. Keyed by id with weak
# references (tensors compare elementwise, so they cannot sit in a WeakSet).
_frozen_by_dropmuon: dict[int, weakref.ref] = {}


def frozen_by_dropmuon(param: torch.Tensor) -> bool:
    """Whether ``param`` does not require grad because a DropMuon optimizer froze it."""
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


def set_layer_trainable(params, active: bool) -> None:
    """requires_grad = active for one layer's parameters; frozen ones lose stale gradients."""
    for p in params:
        set_trainable(p, active)
        if not active:
            p.grad = None


def apply_mask(param_groups: Sequence[dict], mask: Sequence[bool]) -> None:
    """Freezes every group whose layer (``group["layer"]``, its position) the mask leaves out,
    and makes the others trainable."""
    for group in param_groups:
        set_layer_trainable(group["params"], mask[group["layer"]])


def unfreeze(param_groups: Sequence[dict]) -> None:
    """requires_grad back on for every parameter of the groups."""
    for group in param_groups:
        for p in group["params"]:
            set_trainable(p, True)
