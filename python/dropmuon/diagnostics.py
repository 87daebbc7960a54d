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
step found gradients for, and the truncation check looks at the inputs' ``requires_grad`` when
the cutoff layer's module returns (from :mod:`dropmuon.truncation`'s hooks), and at whether any
forward pass went through those hooks since the last step.
"""

from __future__ import annotations

import warnings

from torch import Tensor


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
        stacklevel=6,  # the user's opt.step(): through check_gradients, step, torch's wrappers
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


def warn_no_forward_seen(step: int) -> None:
    warnings.warn(
        f"DropMuon: step {step} found gradients, but no module call ran in grad mode since the "
        "last step where DropMuon could freeze the layers below the cutoff, so the backward "
        "ran through all of them (training is still correct; the saving is gone). Usual "
        "causes: model.compile(), which compiles the module call DropMuon hooks into (fix: "
        "model = torch.compile(model), whose wrapper call runs the hooks), or a forward written "
        "with functional calls outside any nn.Module. Reported once.",
        TruncationDefeatedWarning,
        stacklevel=6,
    )


class Diagnostics:
    """The optimizer's checks: :meth:`check_gradients` and :meth:`check_forward_seen` run in
    each step, :meth:`check_cutoff_input` when the cutoff layer's module returns."""

    def __init__(self) -> None:
        self.warned_layers: set[int] = set()
        self.warned_truncation = False

    def check_gradients(
        self, active: list[bool], with_grad, layer_names, step: int, user_frozen=()
    ) -> None:
        """Warns for each active layer (position) not among ``with_grad``, when some layer has a
        gradient (a step with none at all is a step before any backward, not a defeated
        stack); layers in ``user_frozen`` (none of their parameters requires grad: the user
        froze them) are expected to have none. ``layer_names()`` is called only to word a
        warning."""
        if not with_grad:
            return
        for layer, is_active in enumerate(active):
            if layer in user_frozen:
                continue
            if is_active and layer not in with_grad and layer not in self.warned_layers:
                self.warned_layers.add(layer)
                warn_no_gradient(layer, layer_names()[layer], step)

    def check_cutoff_input(self, args, kwargs, cutoff: int, name: str) -> None:
        """Warns (once) when an input of the cutoff layer's call requires grad."""
        if self.warned_truncation:
            return
        inputs = list(args) + list((kwargs or {}).values())
        if any(isinstance(x, Tensor) and x.requires_grad for x in inputs):
            self.warned_truncation = True
            warn_truncation_defeated(cutoff, name)

    def check_forward_seen(self, forwards: int, froze_something: bool, with_grad, step: int):
        """Warns (once) when a step that should have frozen layers found gradients but no
        forward pass went through the hooks that freeze them."""
        if forwards == 0 and froze_something and with_grad and not self.warned_truncation:
            self.warned_truncation = True
            warn_no_forward_seen(step)
