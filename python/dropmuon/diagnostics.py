"""Warnings for the stacks that silently defeat what DropMuon promises, each given once per
cause, each with a category of its own (all subclasses of :class:`DropMuonWarning`, so that
``warnings.filterwarnings("ignore", category=dropmuon.DropMuonWarning)`` silences them all):

- :class:`NoGradientWarning`: an active layer got no gradient in a step where others did, so
  it was not updated. Under reentrant activation checkpointing this is what happens when the
  layer feeding a checkpointed segment is frozen: the segment's input does not require grad,
  and reentrant checkpointing then computes no gradient for anything inside it.
- :class:`TruncationDefeatedWarning`: the first active layer's input requires grad while the
  layers below it are frozen, so the backward runs through every frozen layer (training stays
  correct; the saving is gone). Only a warning: an input gradient can be intended.

The checks cost a few comparisons per step: the no-gradient check reads which parameters the
step found gradients for, and the truncation check is one forward pre-hook, on the cutoff
layer's module only, that looks at its inputs' ``requires_grad``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .partition import Layer


class DropMuonWarning(UserWarning):
    """The base of every warning DropMuon gives about a stack that defeats it."""


class NoGradientWarning(DropMuonWarning):
    """An active layer received no gradient: it was not updated."""


class TruncationDefeatedWarning(DropMuonWarning):
    """Backprop ran through frozen layers: truncation saved nothing."""


def warn_no_gradient(layer: int, name: str, step: int) -> None:
    warnings.warn(
        f"DropMuon: layer {layer} ({name}) is active at step {step} but received no gradient, "
        "so it was not updated. Likely causes: (1) reentrant activation checkpointing "
        "(torch.utils.checkpoint.checkpoint(..., use_reentrant=True), or checkpoint_sequential "
        "without use_reentrant=False): when the layer feeding a checkpointed segment is frozen, "
        "the segment's input does not require grad and nothing inside it gets a gradient; fix: "
        "pass use_reentrant=False (Hugging Face: gradient_checkpointing_kwargs="
        "{'use_reentrant': False}); (2) the layer's output was detached or not used in the "
        "loss; (3) its gradients were cleared before step(). Reported once per layer.",
        NoGradientWarning,
        stacklevel=4,
    )


def warn_truncation_defeated(layer: int, name: str) -> None:
    warnings.warn(
        f"DropMuon: the input of the cutoff layer {layer} ({name}) requires grad while the "
        "layers below it are frozen, so the backward pass runs through every frozen layer and "
        "truncation saves nothing (training is still correct). Usual causes: Hugging Face's "
        "gradient checkpointing calling enable_input_require_grads() (fix: non-reentrant "
        "checkpointing and model.disable_input_require_grads(), or dropmuon.integrations."
        "DropMuonCallback, which does both), or a model input made to require grad "
        "(x.requires_grad_()). Ignore this warning if you need input gradients. Reported once.",
        TruncationDefeatedWarning,
        stacklevel=2,
    )


class Diagnostics:
    """The optimizer's two checks. :meth:`watch_cutoff` moves the truncation check to the
    coming step's cutoff layer; :meth:`check_gradients` runs in each step."""

    def __init__(self) -> None:
        self.warned_layers: set[int] = set()
        self.warned_truncation = False
        self._handle = None

    def check_gradients(self, active: list[bool], with_grad, layer_names, step: int) -> None:
        """Warns for each active layer (position) not among ``with_grad``, when some layer has a
        gradient (a step with none at all is a step before any backward, not a defeated
        stack). ``layer_names()`` is called only to word a warning."""
        if not with_grad:
            return
        for layer, is_active in enumerate(active):
            if is_active and layer not in with_grad and layer not in self.warned_layers:
                self.warned_layers.add(layer)
                warn_no_gradient(layer, layer_names()[layer], step)

    def watch_cutoff(self, cutoff: int, param_groups, group_layers: list[Layer]) -> None:
        """Checks, in the next forward, whether the input of the layer at position ``cutoff``
        (the layer of the group with that ``"layer"``) requires grad. No check at cutoff 0
        (nothing is frozen below), for a layer without a module (param groups), or once the
        warning was given."""
        self.stop_watching()
        if cutoff == 0 or self.warned_truncation:
            return
        layer = next(lay for g, lay in zip(param_groups, group_layers) if g["layer"] == cutoff)
        if layer.module is None:
            return
        name = layer.name

        def hook(module, args, kwargs):
            if torch.compiler.is_compiling():
                return
            inputs = list(args) + list(kwargs.values())
            if any(isinstance(x, Tensor) and x.requires_grad for x in inputs):
                self.warned_truncation = True
                self.stop_watching()
                warn_truncation_defeated(cutoff, name)

        self._handle = layer.module.register_forward_pre_hook(hook, with_kwargs=True)

    def stop_watching(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
