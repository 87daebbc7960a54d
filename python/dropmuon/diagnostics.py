"""Warnings for the stacks that silently defeat what DropMuon promises, each given once per
cause, each with a category of its own (all subclasses of :class:`DropMuonWarning`, so that
``warnings.filterwarnings("ignore", category=dropmuon.DropMuonWarning)`` silences them all):

- :class:`NoGradientWarning`: an active layer got no gradient in a step where others did, so
  it was not updated. Under reentrant activation checkpointing this is what happens when the
  layer feeding a checkpointed segment is frozen: the segment's input does not require grad,
  and reentrant checkpointing then computes no gradient for anything inside it.
- :class:`LayerOrderWarning`: the first forward never used some managed parameters, or no
  forward ran before the first step, so those layers' places are guessed.
- :class:`TruncationDefeatedWarning`: the first active layer's input requires grad while the
  layers below it are frozen, so the backward runs through every frozen layer (training stays
  correct; the saving is gone). Only a warning: an input gradient can be intended.

The checks cost a few comparisons per step: the no-gradient check reads which parameters the
step found gradients for, and the truncation check looks at the inputs' ``requires_grad`` when
the cutoff layer's module returns (from :mod:`dropmuon.layers.truncation`'s hooks), and at whether
any forward pass went through those hooks since the last step.
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


class LayerOrderWarning(DropMuonWarning):
    """Some layers' place in the forward is unknown: they are ordered as the warning says."""


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


def warn_truncation_defeated(layer: int, name: str, cause: str) -> None:
    warnings.warn(
        f"DropMuon: the input of the cutoff layer {layer} ({name}) requires grad while the "
        "layers below it are frozen, so the backward pass runs below the cutoff and truncation "
        f"saves less or nothing (training is still correct). {cause} Reported once.",
        TruncationDefeatedWarning,
        stacklevel=2,
    )


def truncation_cause(leaves: list[Tensor], names: dict[int, str], managed, inputs) -> str:
    """Why the cutoff's input requires grad, from the tensors requiring grad that its autograd
    graph reaches (``leaves``): parameters the optimizer does not manage, a model input, or a
    tensor made to require grad inside the forward."""
    params = [t for t in leaves if id(t) in names]
    other = [names[id(t)] for t in params if id(t) not in managed]
    ours = [names[id(t)] for t in params if id(t) in managed]
    input_ids = {id(x) for x in inputs}
    fed = [t for t in leaves if id(t) in input_ids]
    made = [t for t in leaves if id(t) not in names and id(t) not in input_ids]

    def listed(items):
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    causes = []
    if other:
        causes.append(
            "Parameters below it that DropMuon does not manage still require grad "
            f"({listed(other)}: another optimizer's, or in none), and the backward must reach "
            "them; fix: give them to DropMuon (its fallback updates vectors and "
            "embeddings), or freeze them, or accept the backward down to them."
        )
    if ours:
        causes.append(
            f"DropMuon's own parameters {listed(ours)} are used below the cutoff although "
            "their layer is above it (a parameter used in two places: its layer is placed "
            "at its first use)."
        )
    if fed:
        causes.append(
            "The model's input requires grad (x.requires_grad_()); ignore this warning if you "
            "need input gradients."
        )
    if made:
        causes.append(
            "A tensor made to require grad inside the forward: usually Hugging Face's "
            "enable_input_require_grads(), which gradient checkpointing calls (fix: non-reentrant "
            "checkpointing and model.disable_input_require_grads(), or dropmuon.integrations."
            "DropMuonCallback, which does both)."
        )
    return (
        " ".join(causes)
        or "No tensor requiring grad was found below it (a custom autograd Function?)."
    )


def grad_leaves(tensors: list[Tensor], limit: int = 1_000_000) -> list[Tensor]:
    """The leaf tensors requiring grad that the autograd graphs of ``tensors`` reach (each
    once), searched through at most ``limit`` graph nodes."""
    leaves = {id(t): t for t in tensors if t.requires_grad and t.grad_fn is None}
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen: set = set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if isinstance(variable, Tensor):
            leaves.setdefault(id(variable), variable)
        stack.extend(following for following, _ in node.next_functions if following is not None)
    return list(leaves.values())


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


def warn_unused_layers(names: list[str]) -> None:
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    warnings.warn(
        f"DropMuon: the first forward pass never used the parameters of {shown}, so their "
        "place in the model is unknown: they are ordered first (active only when every layer "
        "is). If the model holds them without using them, leave them out of the optimizer; if "
        "they are used outside the model's forward (a loss module's weights, a second model "
        "call), pass the module that uses them to DropMuon too, or give them to another "
        "optimizer. Reported once.",
        LayerOrderWarning,
        stacklevel=6,
    )


def warn_order_unknown(count: int) -> None:
    warnings.warn(
        f"DropMuon: the first step came before any module call in grad mode, so the order in "
        f"which the model uses these {count} parameters is unknown: each is a layer of its "
        "own, in the order given, and truncation follows that order. Run the forward through "
        "an nn.Module before the first step, pass the model itself (DropMuon(model)), or give "
        "the param groups 'layer' keys. Reported once.",
        LayerOrderWarning,
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

    def check_cutoff_input(self, args, kwargs, cutoff: int, name: str, outer, managed) -> None:
        """Warns (once) when an input of the cutoff layer's call requires grad, naming why:
        the tensors requiring grad its graph reaches, read against the parameters of the
        pass's outermost module and its tensor arguments (``outer``: the model and its input)
        and the ids of the optimizer's parameters (``managed``)."""
        if self.warned_truncation:
            return
        inputs = [x for x in (*args, *(kwargs or {}).values()) if isinstance(x, Tensor)]
        needing = [x for x in inputs if x.requires_grad]
        if not needing:
            return
        self.warned_truncation = True
        module, model_inputs = outer
        names = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
        cause = truncation_cause(grad_leaves(needing), names, managed, model_inputs)
        warn_truncation_defeated(cutoff, name, cause)

    def check_forward_seen(self, forwards: int, froze_something: bool, with_grad, step: int):
        """Warns (once) when a step that should have frozen layers found gradients but no
        forward pass went through the hooks that freeze them."""
        if forwards == 0 and froze_something and with_grad and not self.warned_truncation:
            self.warned_truncation = True
            warn_no_forward_seen(step)
