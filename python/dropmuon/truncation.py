"""Truncation: while a forward pass runs, the layers below the cutoff do not require grad, so
autograd records nothing for them and the backward stops at the cutoff.

Autograd records no graph for a computation whose inputs do not require grad. With the
parameters of the frozen layers not requiring grad (and the model input not requiring it), the
first layer that records anything is the cutoff layer: the backward computes no input- or
weight-gradient below it and saves no activations there (docs/method.md section 7).

**The freeze lasts one forward pass.** It is applied when the outermost module call starts in
grad mode and lifted when that call returns. The graph is recorded by then, so lifting it
changes nothing for the backward, and between forward passes every ``requires_grad`` flag is
the user's own: ``torch.save(model)``, ``copy.deepcopy(model)``, a second optimizer, or code that
filters ``p.requires_grad`` see the model as the user left it. Only flags turned off here are
turned back on, so a parameter the user froze stays frozen.

The hooks are process-wide module hooks (``register_module_forward_pre_hook`` /
``register_module_forward_hook``), installed while some optimizer watches forwards, so nothing
is stored on the model. Inside a region that ``torch.compile`` traces they do nothing: with
``torch.compile(model)`` the wrapper's own call (which runs eagerly) is the outermost call and
applies the freeze, so each set of frozen layers is one graph; ``model.compile()`` traces the
outermost call itself, so it gets no freeze (the optimizer says so, see
:mod:`dropmuon.diagnostics`). torch warns when global hooks meet ``torch.compile(model)``
("the hooks fire an extra time for the OptimizedModule"): that extra call is the one relied on
here, so installing the hooks silences that one message.

**Which optimizer freezes.** An optimizer is *armed* from its construction and after each of its
steps. It disarms when another optimizer steps a parameter it manages (a second optimizer built
on the same model takes over) and when its :meth:`disarm` is called (DropMuon's ``unfreeze()``);
its next step arms it again.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.nn.modules import module as _module
from torch.optim import optimizer as _optimizer


class ForwardWatcher:
    """What an optimizer does at the start and end of module calls; the base does nothing.

    ``enter(module, args, outermost)`` runs before a module's forward, ``exit(module, args,
    kwargs, outermost)`` after it (also when the forward raised, with ``kwargs`` None).
    ``outermost`` marks the call that opened the forward pass."""

    def enter(self, module, args, outermost: bool) -> None:
        pass

    def exit(self, module, args, kwargs, outermost: bool) -> None:
        pass

    def other_optimizer_stepped(self, params: Iterable[Tensor]) -> None:
        pass

    def belongs_to(self, optimizer) -> bool:
        return False

    def wants_eager(self, module) -> bool:
        """Whether the forward pass ``module`` starts must run eagerly under torch.compile."""
        return False


class _Registry:
    """The process-wide hooks and the live watchers (held weakly: a watcher lives as long as its
    optimizer, and an optimizer nobody holds anymore stops freezing). Each thread counts its
    nested module calls; the count belongs to one installation of the hooks (``generation``),
    so removing them mid-call on another thread cannot leave a stale count behind."""

    def __init__(self) -> None:
        self.watchers: weakref.WeakSet[ForwardWatcher] = weakref.WeakSet()
        self.handles: list = []
        self.generation = 0
        self.local = threading.local()

    def add(self, watcher: ForwardWatcher) -> None:
        self.watchers.add(watcher)
        if not self.handles:
            # torch warns that global hooks also run for torch.compile's wrapper: that call is
            # the one this module relies on (see the module docstring).
            warnings.filterwarnings(
                "ignore", message=r"Using `torch.compile\(module\)` when there are global hooks"
            )
            self.generation += 1
            self.handles = [
                _module.register_module_forward_pre_hook(_enter),
                _module.register_module_forward_hook(_exit, with_kwargs=True, always_call=True),
                _optimizer.register_optimizer_step_pre_hook(_optimizer_step),
            ]

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def depth(self) -> int:
        """This thread's nesting of module calls under the current hooks."""
        local = self.local
        return local.depth if getattr(local, "generation", None) == self.generation else 0

    def set_depth(self, depth: int) -> None:
        self.local.generation, self.local.depth = self.generation, depth


_REGISTRY = _Registry()


def watch(watcher: ForwardWatcher) -> None:
    """Calls ``watcher`` around every module call from now on, while it is alive."""
    _REGISTRY.add(watcher)


def unwatch(watcher: ForwardWatcher) -> None:
    """Stops calling ``watcher``; the hooks go once no watcher is left."""
    _REGISTRY.watchers.discard(watcher)


def _enter(module, args):
    if torch.compiler.is_compiling():
        return None
    depth = _REGISTRY.depth()
    watchers = list(_REGISTRY.watchers)
    if not watchers and depth == 0:  # every optimizer is gone: no more hooks
        _REGISTRY.remove_hooks()
        return None
    _REGISTRY.set_depth(depth + 1)
    if depth == 0 and any(w.wants_eager(module) for w in watchers):
        _REGISTRY.local.stance = _eager_stance()
    for watcher in watchers:
        watcher.enter(module, args, depth == 0)
    return None


def _exit(module, args, *rest):
    # (kwargs, output) normally; (output,) when the forward raised (torch then passes no kwargs)
    if torch.compiler.is_compiling():
        return None
    depth = _REGISTRY.depth()
    if depth == 0:  # the call started before the hooks were installed
        return None
    _REGISTRY.set_depth(depth - 1)
    kwargs = rest[0] if len(rest) == 2 else None
    for watcher in list(_REGISTRY.watchers):
        watcher.exit(module, args, kwargs, depth == 1)
    stance = getattr(_REGISTRY.local, "stance", None)
    if depth == 1 and stance is not None:
        _REGISTRY.local.stance = None
        stance.__exit__(None, None, None)
    return None


def _optimizer_step(optimizer, args, kwargs):
    wrapped = [optimizer]  # accelerate's AcceleratedOptimizer and the like wrap one in .optimizer
    while len(wrapped) < 8 and getattr(wrapped[-1], "optimizer", None) is not None:
        wrapped.append(wrapped[-1].optimizer)
    others = [w for w in _REGISTRY.watchers if not any(w.belongs_to(o) for o in wrapped)]
    if others:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for watcher in others:
            watcher.other_optimizer_stepped(params)
    return None


class LayerFreeze:
    """The freeze of one forward pass: :meth:`apply` turns ``requires_grad`` off on the given
    parameters that have it on, :meth:`lift` turns exactly those back on."""

    def __init__(self) -> None:
        self.turned_off: list[Tensor] = []

    def apply(self, params: Iterable[Tensor]) -> None:
        for p in params:
            if p.requires_grad:
                p.requires_grad_(False)
                self.turned_off.append(p)

    def lift(self) -> None:
        for p in self.turned_off:
            p.requires_grad_(True)
        self.turned_off = []


class ForwardFreeze(ForwardWatcher):
    """One optimizer's side of the hooks: the coming step's freeze for each forward pass in grad
    mode, the first forward's trace (layers frozen as it reaches them), and the cutoff layer's
    input check. The optimizer sets what the coming step leaves out with :meth:`set_step`."""

    def __init__(self, optimizer, diagnostics) -> None:
        self._optimizer = weakref.ref(optimizer)  # no cycle: a dropped optimizer stops freezing
        self.diagnostics = diagnostics
        self.armed = True
        self.mask: list[bool] = []
        self.frozen: list[Tensor] = []  # the coming step's inactive parameters
        self.managed: set[int] = set()
        self.trace = None  # a partition.FirstForwardTrace until the first step
        self.cutoff_module = None
        self.cutoff_label = (0, "")
        self.forwards = 0  # forward passes in grad mode since the last step
        self._freeze = LayerFreeze()
        self._in_grad_forward = False

    def belongs_to(self, optimizer) -> bool:
        return self._optimizer() is optimizer

    def wants_eager(self, module) -> bool:
        # The trace must see every module call of the model's first forward.
        model = self.trace.model if self.trace is not None else None
        return model is not None and any(m is model for m in module.modules())

    def set_step(self, mask, frozen, cutoff_module=None, cutoff_label=(0, "")) -> None:
        """The coming step: its mask by position, its inactive parameters (those of layers with
        a known position), and the cutoff layer's module (for the input check)."""
        self.mask, self.frozen = list(mask), list(frozen)
        self.cutoff_module, self.cutoff_label = cutoff_module, cutoff_label

    def other_optimizer_stepped(self, params) -> None:
        if self.armed and any(id(p) in self.managed for p in params):
            self.armed = False

    def enter(self, module, args, outermost: bool) -> None:
        if outermost:
            self._in_grad_forward = torch.is_grad_enabled()
            if self._in_grad_forward:
                self.forwards += 1
                if self.armed:
                    self._freeze.apply(self.frozen)
                    if self.trace is not None:
                        self._freeze.apply(self.trace.params_at(self.mask, active=False))
        if self.trace is not None:
            found = self.trace.reached(module)
            if found is not None and self._in_grad_forward and self.armed:
                layer, position = found
                if not self.mask[position]:
                    self._freeze.apply(p for _, p in layer.params)

    def exit(self, module, args, kwargs, outermost: bool) -> None:
        if module is self.cutoff_module and self._in_grad_forward and self.armed:
            self.diagnostics.check_cutoff_input(args, kwargs, *self.cutoff_label)
        if outermost:
            self._freeze.lift()
            self._in_grad_forward = False


def _eager_stance():
    """Runs the traced first forward eagerly under torch.compile, so that the hooks see every
    module and freeze step 0's layers (later forwards compile as usual); None where the stance
    cannot change (inside a compiled region's eager fallback)."""
    try:
        return torch.compiler.set_stance("force_eager")
    except RuntimeError:
        return None
