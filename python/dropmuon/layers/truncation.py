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
on the same model takes over) and when ``DropMuon.unfreeze()`` is called; its next step arms
it again.
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

from .trace import ParamUse


class ForwardWatcher:
    """What an optimizer does at the start and end of module calls; the base does nothing.

    ``enter(module, args, outermost)`` runs before a module's forward, ``exit(module, args,
    kwargs, outermost)`` after it (also when the forward raised, with ``kwargs`` None).
    ``outermost`` marks the call that opened the forward pass; an exception ``exit`` returns is
    raised once the pass has ended (every freeze lifted)."""

    def enter(self, module, args, outermost: bool) -> None:
        pass

    def exit(self, module, args, kwargs, outermost: bool) -> Exception | None:
        return None

    def other_optimizer_stepped(self, params: Iterable[Tensor]) -> None:
        pass

    def belongs_to(self, optimizer) -> bool:
        return False

    def forward_ended(self) -> None:
        """The forward pass is over, whether or not its end was seen."""

    def wants_eager(self, module) -> bool:
        """Whether the forward pass ``module`` starts must run eagerly under torch.compile."""
        return False

    def sees_every_call(self) -> bool:
        """Whether the coming forward pass must show this watcher every module call."""
        return False


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


class _Registry:
    """The process-wide hooks and the live watchers (held weakly: a watcher lives as long as its
    optimizer, and an optimizer nobody holds anymore stops freezing).

    Any module hook sends every module call through torch's slower hook path (about 4 us a
    call, benchmarks/RESULTS.md section 2), so the global hooks catch the outermost call and
    then, when no watcher needs the calls inside it (a first-forward trace does, and so does the
    first pass at each cutoff, for its input check), step aside for that forward pass: they
    leave torch's global hook tables (to come back under the same ids, so that compiled code
    guarding on those tables keeps matching) and two hooks on the outermost module alone see
    its end. A compiled outermost call (``torch.compile(model)``'s wrapper) keeps them: inside
    compiled code they cost nothing. While the global hooks see every call, each thread counts
    its nested calls."""

    def __init__(self) -> None:
        self.watchers: weakref.WeakSet[ForwardWatcher] = weakref.WeakSet()
        self.handles: list = []  # the global pre-hook, forward hook and optimizer step hook
        self.local = threading.local()
        self.hidden = False
        self.pass_handles: list = []  # the outermost module's hooks in a light pass
        self.pass_module = None
        self.pass_depth = 0
        # Every watcher's freeze of the pass in progress, kept here so that it is lifted even
        # when the watcher's optimizer is gone by then (an interrupted pass, see below).
        self.freeze = LayerFreeze()

    def add(self, watcher: ForwardWatcher) -> None:
        self.watchers.add(watcher)
        if not self.handles:
            # torch warns that global hooks also run for torch.compile's wrapper: that call is
            # the one this module relies on (see the module docstring).
            warnings.filterwarnings(
                "ignore", message=r"Using `torch.compile\(module\)` when there are global hooks"
            )
            self.handles = [
                _module.register_module_forward_pre_hook(_enter),
                _module.register_module_forward_hook(_exit, with_kwargs=True, always_call=True),
                _optimizer.register_optimizer_step_pre_hook(_optimizer_step),
            ]
            self.local = threading.local()

    def remove_all(self) -> None:
        self.show()
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def hide(self) -> None:
        """Takes the global module hooks out of torch's tables (their ids kept)."""
        _module._global_forward_pre_hooks.pop(self.handles[0].id, None)
        _module._global_forward_hooks.pop(self.handles[1].id, None)
        self.hidden = True

    def show(self) -> None:
        if self.hidden and self.handles:
            _module._global_forward_pre_hooks[self.handles[0].id] = _enter
            _module._global_forward_hooks[self.handles[1].id] = _exit
        self.hidden = False

    def depth(self) -> int:
        """This thread's nesting of module calls seen by the global hooks."""
        return getattr(self.local, "depth", 0)

    def set_depth(self, depth: int) -> None:
        self.local.depth = depth

    def start_light_pass(self, module) -> None:
        """The outermost call ``module`` started and no watcher needs the calls inside it."""
        self.hide()
        self.pass_module, self.pass_depth = module, 1
        self.pass_handles = [
            module.register_forward_pre_hook(_light_reenter),
            module.register_forward_hook(_light_exit, with_kwargs=True, always_call=True),
        ]

    def end_light_pass(self) -> None:
        for handle in self.pass_handles:
            handle.remove()
        self.pass_handles, self.pass_module = [], None
        self.show()


_REGISTRY = _Registry()


def watch(watcher: ForwardWatcher) -> None:
    """Calls ``watcher`` around every module call from now on, while it is alive."""
    _REGISTRY.add(watcher)


def unwatch(watcher: ForwardWatcher) -> None:
    """Stops calling ``watcher``; the hooks go once no watcher is left."""
    _REGISTRY.watchers.discard(watcher)


def end_interrupted_pass() -> None:
    """Ends a forward pass that never returned (a KeyboardInterrupt, which torch's
    always-called hooks do not see): the hooks back in place and the pass's freeze lifted,
    whichever optimizer applied it. Called from outside any forward pass: DropMuon calls it
    when it is built and at ``zero_grad``, ``step``, ``state_dict``, ``add_param_group`` and
    ``unfreeze``."""
    if _REGISTRY.pass_module is not None:
        _REGISTRY.end_light_pass()
    _end_pass()


def _end_pass() -> None:
    """The end of the outermost call: every freeze lifted, every watcher told."""
    _REGISTRY.set_depth(0)
    _REGISTRY.freeze.lift()
    stance = getattr(_REGISTRY.local, "stance", None)
    if stance is not None:
        _REGISTRY.local.stance = None
        stance.__exit__(None, None, None)
    for watcher in list(_REGISTRY.watchers):
        watcher.forward_ended()


def _kwargs_of(rest):
    # (kwargs, output) normally; (output,) when the forward raised (torch then passes no kwargs)
    return rest[0] if len(rest) == 2 else None


def compiled(module) -> bool:
    """Whether ``module`` is torch.compile's wrapper of a module."""
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule)


def _enter(module, args):
    if torch.compiler.is_compiling():
        return None
    depth = _REGISTRY.depth()
    watchers = list(_REGISTRY.watchers)
    if not watchers and depth == 0:  # every optimizer is gone: no more hooks
        _REGISTRY.remove_all()
        return None
    if depth == 0 and any(w.wants_eager(module) for w in watchers):
        _REGISTRY.local.stance = _eager_stance()
    for watcher in watchers:
        watcher.enter(module, args, depth == 0)
    if depth == 0 and not compiled(module) and not any(w.sees_every_call() for w in watchers):
        _REGISTRY.start_light_pass(module)
    else:
        _REGISTRY.set_depth(depth + 1)
    return None


def _exit(module, args, *rest):
    if torch.compiler.is_compiling():
        return None
    depth = _REGISTRY.depth()
    if depth == 0:  # the call started before the hooks were installed
        return None
    _REGISTRY.set_depth(depth - 1)
    errors = [
        watcher.exit(module, args, _kwargs_of(rest), depth == 1)
        for watcher in list(_REGISTRY.watchers)
    ]
    if depth == 1:
        _end_pass()
        for error in errors:
            if error is not None:
                raise error
    return None


def _light_reenter(module, args):
    if not torch.compiler.is_compiling() and _REGISTRY.pass_module is module:
        _REGISTRY.pass_depth += 1  # the outermost module called again inside itself
    return None


def _light_exit(module, args, *rest):
    if torch.compiler.is_compiling() or _REGISTRY.pass_module is not module:
        return None
    _REGISTRY.pass_depth -= 1
    if _REGISTRY.pass_depth == 0:
        _REGISTRY.end_light_pass()
        for watcher in list(_REGISTRY.watchers):
            watcher.exit(module, args, _kwargs_of(rest), True)
        _end_pass()
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


class ForwardFreeze(ForwardWatcher):
    """One optimizer's side of the hooks: the coming step's freeze for each forward pass in grad
    mode, the first forward's trace (layers frozen as it reaches them), and the cutoff layer's
    input check. The optimizer sets what the coming step leaves out with :meth:`prepare`."""

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
        self.checked_cutoffs: set[int] = set()  # cutoffs whose input check has run
        self._use_mode = None  # the first forward's ParamUse mode, while it runs
        self.layers_pending = False  # the optimizer's layers are found at the first forward
        self._in_grad_forward = False
        self._outer: tuple = (None, [])  # (outermost module, its tensor arguments) of a pass

    def belongs_to(self, optimizer) -> bool:
        return self._optimizer() is optimizer

    def sees_every_call(self) -> bool:
        # The trace; or the cutoff layer's input check, once per cutoff, until it warns.
        unchecked = self.cutoff_label[0] not in self.checked_cutoffs
        watching = self.cutoff_module is not None and self.armed and unchecked
        return self.trace is not None or (watching and not self.diagnostics.warned_truncation)

    def wants_eager(self, module) -> bool:
        # The trace must see every module call of the model's first forward.
        if self.layers_pending:
            return True
        model = self.trace.model if self.trace is not None else None
        return model is not None and any(m is model for m in module.modules())

    def prepare(self, layers) -> None:
        """The coming step's freeze, from the optimizer's :class:`~dropmuon.layers.book.
        LayerBook`: its mask by position, its inactive parameters, and the cutoff layer's
        module (for the input check). While the first forward is traced, the layers are frozen
        as it reaches them instead; Muon's ordered layers need no hooks at all."""
        if self.trace is not None and layers.trace is None:
            self.checked_cutoffs.clear()  # keyed by position, which the trace has just set
        self.trace, self.layers_pending = layers.trace, layers.pending
        self.mask, self.frozen = list(layers.mask), []
        self.cutoff_module, self.cutoff_label = None, (0, "")
        if self.trace is not None:
            return
        if layers.updates_every_layer():
            unwatch(self)
            return
        self.frozen = layers.inactive_params()
        cutoff = layers.cutoff_layer()
        if layers.cutoff > 0:  # nothing is frozen at cutoff 0
            self.cutoff_module, self.cutoff_label = cutoff.module, (layers.cutoff, cutoff.name)

    def other_optimizer_stepped(self, params) -> None:
        if self.armed and any(id(p) in self.managed for p in params):
            self.armed = False

    def enter(self, module, args, outermost: bool) -> None:
        if outermost and self.layers_pending:
            optimizer = self._optimizer()
            if optimizer is not None:
                optimizer._find_layers(module)
        if outermost:
            self._in_grad_forward = torch.is_grad_enabled()
            # The model run and its input, to name the cause of a defeated truncation.
            inputs = [x for x in args if isinstance(x, Tensor)]
            self._outer = (module, inputs)
            if self._in_grad_forward:
                self.forwards += 1
                if self.armed:
                    _REGISTRY.freeze.apply(self.frozen)
                    if self.trace is not None:
                        _REGISTRY.freeze.apply(self.trace.params_at(self.mask, active=False))
            # The trace follows a forward in grad mode: without it (evaluation) torch may take
            # fused paths that read a block's parameters in one call, in argument order.
            if self.trace is not None and self._in_grad_forward and self._use_mode is None:
                self._use_mode = ParamUse(self._param_used)
                self._use_mode.__enter__()
        if self.trace is not None and self._in_grad_forward:
            self._placed(self.trace.reached(module))

    def _param_used(self, tensor) -> None:
        if self.trace is not None:
            self._placed(self.trace.used(tensor))

    def _placed(self, found) -> None:
        """A layer just placed by the trace: frozen now if step 0 leaves it out."""
        if found is not None and self.armed:
            layer, position = found
            if not self.mask[position]:
                _REGISTRY.freeze.apply(p for _, p in layer.params)

    def exit(self, module, args, kwargs, outermost: bool) -> Exception | None:
        if module is self.cutoff_module and self._in_grad_forward and self.armed:
            self.diagnostics.check_cutoff_input(
                args, kwargs, *self.cutoff_label, self._outer, self.managed
            )
            self.checked_cutoffs.add(self.cutoff_label[0])
        traced = outermost and self._in_grad_forward and self.trace is not None
        if not traced or not self.wants_eager(module):  # not the traced model's pass
            return None
        if self.armed and self.trace.nothing_active(self.mask):
            unused = [layer.name for layer in self.trace.unplaced()]
            return RuntimeError(
                f"DropMuon: the coming step's cutoff (layer {sum(not m for m in self.mask)} of "
                f"{len(self.mask)}) lies above every layer this first forward pass used, "
                "because the parameters of " + ", ".join(unused[:6]) + " were never used by "
                "it: nothing in this pass would train and its loss would have no gradient. "
                "Leave parameters the forward does not use out of the optimizer (or give them "
                "to another optimizer)."
            )
        # The pass's end, here: the optimizer may unwatch this watcher (Muon does), and then
        # forward_ended would not come.
        self._close_use_mode()
        self._outer = (None, [])
        optimizer = self._optimizer()
        try:
            if optimizer is not None:
                optimizer._traced_forward_ended()
        except Exception as error:  # raised once the pass has ended, every freeze lifted
            return error
        return None

    def forward_ended(self) -> None:
        self._in_grad_forward = False
        self._outer = (None, [])
        self._close_use_mode()

    def _close_use_mode(self) -> None:
        if self._use_mode is not None:
            mode, self._use_mode = self._use_mode, None
            mode.__exit__(None, None, None)


def _eager_stance():
    """Runs the traced first forward eagerly under torch.compile, so that the hooks see every
    module and freeze step 0's layers (later forwards compile as usual); None where the stance
    cannot change (inside a compiled region's eager fallback)."""
    try:
        return torch.compiler.set_stance("force_eager")
    except RuntimeError:
        return None
