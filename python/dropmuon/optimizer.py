"""The DropMuon optimizer (and Muon, its full-sampling special case): construction, the
orchestration of a step, and the public properties.

Each step updates only the *active* layers: for the cutoff distributions, the layers from a
sampled cutoff up to the output. At the end of every step the next step's layers are drawn;
while each forward pass runs, the other layers' parameters do not require grad, so the backward
stops at the cutoff by itself (no input- or weight-gradient work, and no saved activations,
below it). Between forward passes every ``requires_grad`` flag is the user's own
(:mod:`dropmuon.layers.truncation`). Frozen layers keep their parameters and optimizer state
untouched.

Where the pieces live: everything per layer (which parameters, their order, names and norms,
the draw, the statistics) in one :class:`~dropmuon.layers.book.LayerBook` (:mod:`dropmuon.layers`,
which also holds the freezing); the update math in :mod:`dropmuon.step`; the kernels behind
:mod:`dropmuon.kernels`; DDP and FSDP2 in :mod:`dropmuon.distributed`; the checkpoint section
(:mod:`dropmuon.checkpoint`), the checks (:mod:`dropmuon.checks`), the names and defaults
(:mod:`dropmuon.defaults`).

Parameters by shape (the norm a parameter gets when ``norms``/``fallback`` do not say
otherwise): 0-D and 1-D tensors (scalars, biases, norm gains) are vectors: ``fallback``
(sign, or AdamW). 2-D tensors get the spectral norm. 3-D, 4-D and 5-D tensors (Conv1d/2d/3d
kernels; higher ranks alike) get the spectral norm of their ``size(0) x numel/size(0)``
view. Zero-size tensors are accepted and left as they are. Any memory layout works
(channels_last kernels and transposed views are updated through a row-major copy; momentum
buffers are row-major). Refused at construction with a ValueError: complex parameters,
sparse parameters, and dtypes other than float32, float64 and bfloat16 on the non-AdamW
norms. Refused at step with a RuntimeError, before anything changes: sparse gradients,
gradients whose shape/dtype/device differ from the parameter's, NaN/Inf gradients (see
``nonfinite``), and hyperparameters made invalid after construction (ValueError).

DropMuon with other machinery:

- Data parallel: every rank draws the same layers without communicating; DDP needs
  ``find_unused_parameters=True`` and no ``static_graph``. :func:`dropmuon.distributed.
  wrap_ddp` sets that up and can all-reduce only the active layers; checkpoints do not
  depend on the world size (:mod:`dropmuon.distributed.ddp`).
- ``torch.compile(model)`` (before or after building the optimizer): each set of active
  layers is one graph, since autograd's graph depends on which parameters require grad.
  Cutoff samplings give at most ``num_layers`` graphs, ``tau_nice`` up to
  ``C(num_layers, tau)``; the first forward, which orders the layers, runs eagerly. Raise
  ``torch._dynamo.config.recompile_limit`` (8 by default) above that, or Dynamo gives up and
  runs the model eagerly. ``model.compile()`` (in place) compiles the very call the freezing
  hooks run in, so it trains without truncation and DropMuon warns. :meth:`step` runs eagerly.
- FSDP2 (``fully_shard``): build the optimizer on the sharded model; parameters and
  optimizer state stay sharded, each active matrix is orthogonalized on one rank, frozen
  layers cost no communication (:mod:`dropmuon.distributed.fsdp`).
- Mixed precision: autocast needs nothing; bfloat16 parameters keep bfloat16 momentum in
  its own storage, and gradients are only read. ``torch.amp.GradScaler.step`` skips
  :meth:`step` when it finds Inf/NaN, and then nothing of DropMuon moves: the step
  counter, the sampler and the frozen layers stay, so the retried step updates the same
  layers.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import checkpoint
from .checks import (
    adamw_lr_ratio,
    check_estimate_option,
    check_group,
    check_group_keys,
    check_group_norm,
    check_hyperparameters,
    check_no_duplicates,
    check_optimizer_options,
    screen_nonfinite,
)
from .defaults import (
    DEFAULT_FALLBACK,
    DEFAULT_SAMPLING,
    DEFAULT_SHIFT_STRENGTH,
    DEFAULT_SMOOTHNESS_BETA,
    DEFAULT_SMOOTHNESS_EVERY,
    GROUP_DEFAULTS,
)
from .diagnostics import Diagnostics
from .distributed import fsdp
from .layers import truncation
from .layers.book import LayerBook, SamplerOptions
from .layers.partition import check_layer_keys, check_norms, module_groups
from .layers.sampling import LayerSampler
from .layers.truncation import ForwardFreeze
from .step.update import buckets, initialize_state, update_bucket_
from .update_rules import ns_schedule

_D = GROUP_DEFAULTS


class DropMuon(Optimizer):
    r"""Drop-Muon (Gruntkowska et al., arXiv 2510.02239): Muon-style layer-wise updates of the
    layers from a random cutoff up to the output, with backprop truncated at the cutoff.

    Use it like any ``torch.optim`` optimizer, passing the model itself so that it can find the
    layers (see :mod:`dropmuon.layers.partition`)::

        opt = dropmuon.DropMuon(model, lr=0.02, sampling="uniform")
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

    Per active layer and parameter, with momentum buffer ``M`` and gradient ``G``:
    ``M <- momentum * M + (1 - momentum) * G``; direction ``D = lerp(G, M, momentum)`` (Nesterov)
    or ``M``; ``X <- X * (1 - lr * weight_decay) - t * sharp(D)`` -- exactly torch.optim.Muon's
    step when ``sharp`` is the spectral norm's (Newton-Schulz), which it is for every matrix and
    conv kernel (seen as ``out x in*kh*kw``).

    Which tensors it takes and the norm each gets by shape, and how it works with DDP,
    ``torch.compile``, FSDP2 and mixed precision: this module's docstring
    (``help(dropmuon.optimizer)``).

    Args:
        params: an ``nn.Module``, an iterable of parameters or of (name, parameter) pairs, or
            param groups (dicts). The layers are the modules that own the parameters, ordered
            by where the first forward pass first uses them (for parameters and groups, in the
            model that forward runs). Groups that all carry a ``"layer"`` (int) say the layers
            themselves (input first). A group's ``"norm"`` (default ``"auto"``) overrides its
            parameters' norms; near misses of DropMuon's keys are ValueErrors. README "Layers".
        lr (float or Tensor): learning rate (default 1e-3, as torch.optim.Muon).
        weight_decay: decoupled weight decay, applied with the unadjusted lr (default 0.1).
        momentum: EMA factor of the momentum buffer, in [0, 1] (default 0.95).
        nesterov: use the Nesterov direction (default True).
        ns_coefficients: Newton-Schulz schedule: ``"muon"`` (3.4445, -4.7750, 2.0315; the
            default), one (a, b, c) triple repeated ``ns_steps`` times, a list of triples (one
            per step), or ``"polar_express"`` (Amsel et al. 2025).
        ns_steps: Newton-Schulz iterations (default 5; None with a list of triples).
        eps: lower bound of every divisor in the sharp operators (default 1e-7).
        adjust_lr_fn: ``None``/``"original"`` (lr * sqrt(max(1, rows/cols))) or
            ``"match_rms_adamw"`` (lr * 0.2 * sqrt(max(rows, cols))), as torch.optim.Muon;
            applies to spectral updates (other norms use lr as is).
        ns_precision: ``"bfloat16"`` (default; iterates in bfloat16 with float32-accumulated
            products, as torch.optim.Muon) or ``"native"`` (the parameter's precision, float32 at
            least: more accurate, slower where bfloat16 products are fast).
        radius: ``"fixed"`` (step lr, adjusted as above) or ``"adaptive"``: step
            ``lr * <D, sharp(D)> / (L0 + L1 * <D, sharp(D)>)`` per parameter, the
            (L0, L1)-smoothness radius (docs/method.md section 4; ``lr = 1`` is the theory's step).
        L0, L1: the adaptive radius' constants (per group; defaults 1.0 and 0.0).
        sampling: ``"uniform"`` (default), ``"full"`` (Muon), ``"custom"`` (with
            ``probabilities``), ``"tau_nice"`` (with ``tau``), ``"epoch_shift"`` (with
            ``total_steps`` or :meth:`set_progress`), ``"cost_optimal"`` (from online
            smoothness estimates), a list of cutoff probabilities (same as ``"custom"``), or a
            sampler object (see :mod:`dropmuon.layers.sampling`).
        tau: layers per step for ``"tau_nice"``.
        seed: key of the counter-based layer sampler; the same seed gives the same layers at
            the same step on every process and after a resume (default 0).
        total_steps: ``"epoch_shift"``: training length, so that progress = step / total_steps.
        shift_strength: ``"epoch_shift"``: how strongly progress tilts the cutoff distribution.
        fallback: norm for vectors (biases, norm gains): ``"adamw"`` (default; "Muon for
            matrices, AdamW for the rest") or ``"sign"`` (l_inf, the paper's geometry, dropmuon
            0.1's default: it moves every vector entry by the full lr at every step).
        norms: overrides by role, e.g. ``{"embedding": "column", "head": "row"}``; roles are
            ``matrix``, ``head`` (matrices of the last layer), ``embedding`` (nn.Embedding
            weights) and ``vector``; norms are ``spectral``, ``sign``, ``column``, ``row``,
            ``frobenius`` and ``adamw``. ``column``/``row`` refer to the tensor as stored:
            nn.Embedding stores one token per row, so its per-token normalisation is ``row``.
        adamw_lr: learning rate of AdamW-updated parameters, at the constructor's lr; it follows
            any later change of the group's lr in proportion, so LR schedulers scale it too
            (default: equal to lr).
        adamw_betas, adamw_eps: AdamW's betas and epsilon (defaults (0.9, 0.999) and 1e-8).
        nonfinite: what a NaN/Inf gradient does: ``"raise"`` (default; a RuntimeError naming
            the parameter and layer, before anything is modified) or ``"skip"`` (that layer's
            weights and state stay untouched this step; counted in ``skipped_nonfinite``).
        estimate_smoothness: keep online per-layer smoothness estimates (secants between
            consecutive active steps, :mod:`dropmuon.layers.smoothness`). On by default for
            ``"cost_optimal"``, which needs them. Each refresh costs a copy of the layer's matrix
            gradients, a sharp and a power iteration per matrix (``smoothness_every``).
        smoothness_beta: EMA factor of the smoothness estimates per active step (default
            0.9; ``smoothness_beta ** smoothness_every`` per estimate).
        smoothness_every: refresh a layer's estimate on every k-th of its active steps
            (default 10; 1: every one); the steps in between cost nothing.
        cuda_kernels: CUDA parameters use dropmuon's CUDA kernels (True) or the pure-PyTorch
            reference (False). Default None: ``DROPMUON_CUDA_KERNELS`` (``1``/``0``), else the
            reference until the kernels have passed on real hardware (:mod:`dropmuon.kernels`).
        fsdp_update: with FSDP2-sharded parameters, how the whole-matrix updates are formed:
            ``"owner"`` (default; each active matrix orthogonalized on one rank, two
            all-to-alls) or ``"all_gather"`` (every rank gathers and computes every update; the
            baseline). Ignored without sharded parameters. See :mod:`dropmuon.distributed.fsdp`.
        layers: what a layer of a model is: ``"modules"`` (default; each module holding
            parameters) or ``"blocks"`` (depth units: each block of its repeated-block
            containers, plus what comes before and after them; README "Layers").
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = _D["lr"],
        weight_decay: float = _D["weight_decay"],
        momentum: float = _D["momentum"],
        nesterov: bool = _D["nesterov"],
        ns_coefficients=_D["ns_coefficients"],
        ns_steps: int | None = _D["ns_steps"],
        eps: float = _D["eps"],
        adjust_lr_fn: str | None = _D["adjust_lr_fn"],
        ns_precision: str = _D["ns_precision"],
        radius: str = _D["radius"],
        L0: float = _D["L0"],
        L1: float = _D["L1"],
        sampling=DEFAULT_SAMPLING,
        tau: int | None = None,
        seed: int = 0,
        total_steps: int | None = None,
        shift_strength: float = DEFAULT_SHIFT_STRENGTH,
        fallback: str = DEFAULT_FALLBACK,
        norms: dict[str, str] | None = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = _D["betas"],
        adamw_eps: float = _D["adamw_eps"],
        nonfinite: str = "raise",
        estimate_smoothness: bool | None = None,
        smoothness_beta: float = DEFAULT_SMOOTHNESS_BETA,
        smoothness_every: int = DEFAULT_SMOOTHNESS_EVERY,
        cuda_kernels: bool | None = None,
        fsdp_update: str = "owner",
        layers: str = "modules",
    ) -> None:
        check_hyperparameters(
            lr, weight_decay, momentum, eps, adjust_lr_fn, ns_precision, radius, L0, L1,
            adamw_betas, adamw_eps,
        )  # fmt: skip
        ns_schedule(ns_coefficients, ns_steps)  # validates
        truncation.end_interrupted_pass()  # the flags the model is read with are the user's
        check_optimizer_options(
            nonfinite, smoothness_beta, adamw_lr, lr, cuda_kernels, layers, smoothness_every
        )
        role_norms = check_norms(norms, fallback)
        defaults = dict(
            GROUP_DEFAULTS, lr=lr, weight_decay=weight_decay, momentum=momentum,
            nesterov=nesterov, ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps,
            adjust_lr_fn=adjust_lr_fn, ns_precision=ns_precision, radius=radius, L0=L0, L1=L1,
            adamw_lr_ratio=adamw_lr_ratio(adamw_lr, lr), betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
        )  # fmt: skip
        # The param groups are the user's (a module stands for one named group); torch checks
        # and normalises them. The layers are a partition of the same parameters, beside them.
        model, given = _given_groups(params)
        self._built = False
        super().__init__(given, defaults)
        for g_index, group in enumerate(self.param_groups):
            check_group(group)
            check_group_norm(group)
            check_no_duplicates(group, g_index)
        self._diagnostics = Diagnostics()
        options = SamplerOptions(sampling, seed, tau, total_steps, shift_strength)
        self._layers = LayerBook(
            self.param_groups, model, role_norms=role_norms, fallback=fallback,
            sampler_options=options, smoothness_beta=smoothness_beta,
            smoothness_every=smoothness_every, cuda_kernels=cuda_kernels,
            diagnostics=self._diagnostics, layering=layers,
        )  # fmt: skip
        self._estimate = check_estimate_option(estimate_smoothness, self.sampler)
        self._nonfinite, self._cuda_kernels, self._step_count = nonfinite, cuda_kernels, 0
        self._sharded = fsdp.sharded_update(self._layers, fsdp_update, self._estimate)
        initialize_state(self._layers.params_and_norms(), self.state)
        self._watch_forwards()
        self._built = True

    def _watch_forwards(self) -> None:
        """This optimizer's side of the forward hooks (see :mod:`dropmuon.layers.truncation`),
        armed with the coming step's freeze."""
        self._forward = ForwardFreeze(self, self._diagnostics)
        self._forward.managed = {id(p) for p in self._layers.params()}
        truncation.watch(self._forward)
        self._forward.prepare(self._layers)

    def _layers_changed(self, restart=()) -> None:
        """After the layers or their norms changed: the state of ``restart`` (parameters whose
        norm moved to or from AdamW) starts again, every parameter has its state (zeros, as its
        first update would make it), and the hooks take the coming step's freeze."""
        for p in restart:
            self.state[p] = {}
        initialize_state(self._layers.params_and_norms(), self.state)
        self._forward.managed = {id(p) for p in self._layers.params()}
        self._forward.prepare(self._layers)

    def _find_layers(self, root: nn.Module) -> None:
        """Called by the forward hooks at the first forward of pending layers (see
        :meth:`LayerBook.find_layers`)."""
        restart = self._layers.find_layers(root, self._step_count)
        if restart is not None:
            self._layers_changed(restart)

    def _traced_forward_ended(self) -> None:
        """Called by the forward hooks when the traced forward pass returns: its order is
        adopted at once, so that layer_names(), layer_of() and describe() are right before the
        first step (a later pass of the same step freezes by the final positions)."""
        trace = self._layers.trace
        if trace is not None and trace.positions and self._layers.finish_trace():
            self._layers_changed()

    def add_param_group(self, param_group) -> None:
        """Adds a param group, as torch.optim does (fine-tuning). With ``"layer"`` keys a group
        joins its key's layer or makes one; without, a module-built optimizer gives each new
        parameter its module's layer (placed by the next forward, traced again), others make
        the group one new layer on top. The sampler follows the new number of layers
        (``"custom"`` cannot: ValueError). Nothing changes when the group is refused."""
        if not self._built:  # torch's constructor adds the groups given to it
            super().add_param_group(param_group)
            return
        truncation.end_interrupted_pass()
        param_group = self._layers.new_group(param_group, len(self.param_groups))
        super().add_param_group(param_group)
        try:
            names = self._layers.check_added_group(self.param_groups[-1], len(self.param_groups))
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        self._layers.add_group(self.param_groups[-1], names, self._step_count)
        truncation.watch(self._forward)  # Muon stops watching once ordered: a new trace needs it
        self._layers_changed()

    def _begin_step(self, step: int) -> None:
        """Makes ``step`` the coming step: its layers drawn, the freeze armed."""
        self._step_count = step
        self._layers.mask = self._layers.draw(step)
        self._forward.armed = True
        self._forward.forwards = 0
        self._forward.prepare(self._layers)

    def set_progress(self, progress: float) -> None:
        """Tells ``epoch_shift`` sampling the fraction of training done, in [0, 1]; takes effect
        from the next draw (the layers of the step about to run are already fixed)."""
        if not isinstance(self.sampler, LayerSampler):
            raise TypeError("set_progress applies to the built-in samplers")
        self.sampler.set_progress(progress)

    def unfreeze(self) -> None:
        """Stops freezing layers in the coming forward passes until this optimizer's next
        step: every layer then gets gradients (a full backward). ``requires_grad`` flags are
        never left changed between forward passes, so this is needed only to run other code's
        full backward while this optimizer is alive; another optimizer stepping the same
        parameters does the same by itself. It also lifts the freeze of a forward pass that was
        interrupted (KeyboardInterrupt) before it returned, whichever DropMuon applied it."""
        truncation.end_interrupted_pass()
        self._forward.armed = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's; also ends a forward pass that was interrupted (KeyboardInterrupt)
        before it returned, lifting its freeze (see :func:`dropmuon.layers.truncation.
        end_interrupted_pass`)."""
        truncation.end_interrupted_pass()
        super().zero_grad(set_to_none)

    # -- introspection ----------------------------------------------------------------------------

    num_layers = property(lambda self: self._layers.num_layers, doc="How many layers there are.")
    step_count = property(lambda self: self._step_count, doc="Steps taken (the next one's index).")
    active_layers = property(
        lambda self: list(self._layers.mask), doc="Which layers the next step updates (0: input)."
    )
    cutoff = property(lambda self: self._layers.cutoff, doc="The next step's lowest layer.")
    sampler = property(lambda self: self._layers.sampler, doc="What draws each step's layers.")
    update_counts = property(
        lambda self: self._layers.update_counts, doc="Steps that updated each layer, by position."
    )
    skipped_nonfinite = property(
        lambda self: self._layers.skipped_nonfinite,
        doc='Steps that left each layer out for a NaN/Inf gradient (``nonfinite="skip"``).',
    )
    cutoff_probabilities = property(
        lambda self: self._layers.distribution(self._step_count),
        doc="P(cutoff = i) for the next draw, by position (cost_optimal: from the current "
        "estimates); None for a sampler object of the user's.",
    )
    smoothness = property(
        lambda self: self._layers.smoothness.smoothness,
        doc="Each layer's smoothness estimate (None until it has one, and for a layer without "
        "matrices; ``estimate_smoothness``).",
    )
    layer_order = property(
        lambda self: self._layers.order,
        doc='What ordered the layers: ``"first forward"``, ``"registration (first forward not '
        'yet seen)"``, ``"param groups"``, ``"checkpoint"`` or ``"pending ..."``.',
    )

    def layer_names(self) -> list[str]:
        """The layers' names by position (a module's name, a parameter's name for a layer of one
        tensor, or ``"layer <key>"`` for groups)."""
        return self._layers.layer_names()

    def param_name(self, p: Tensor) -> str:
        """A managed parameter's name: from the module, ``param_names``, or
        ``param_groups[g][i]``."""
        return self._layers.name(p)

    def layer_of(self, p: Tensor) -> int:
        """The position of a managed parameter's layer (0 is the input side)."""
        return self._layers.position(p)

    def norm_of(self, p: Tensor) -> str:
        """The norm a managed parameter is updated in (``spectral``, ``sign``, ..., ``adamw``)."""
        return self._layers.norm(p)

    def is_active(self, p: Tensor) -> bool:
        """Whether the next step updates ``p`` (its layer is active)."""
        return self._layers.is_active(p)

    # -- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Updates the active layers, then draws the next step's layers."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        truncation.end_interrupted_pass()  # outside any forward, none may be in progress
        layers = self._layers
        if layers.pending:
            self._layers_changed(layers.layers_without_forward(self._step_count))
        if layers.finish_trace():
            self._layers_changed()
        by_layer, schedules = layers.active_gradients()
        self._diagnostics.check_gradients(
            layers.mask, by_layer, layers.layer_names, self._step_count, layers.user_frozen()
        )
        froze = self._forward.armed and not all(layers.mask)
        self._diagnostics.check_forward_seen(
            self._forward.forwards, froze, by_layer, self._step_count
        )
        by_layer = screen_nonfinite(by_layer, layers, self._sharded, self._nonfinite)
        estimator = layers.smoothness
        if self._estimate:
            embeddings = layers.embedding_ids()
            before = estimator.before_step(by_layer, self.state, layers.update_counts, embeddings)
        active_buckets = buckets(chain(*by_layer.values()), schedules)
        if self._sharded is not None:
            self._sharded.update_(active_buckets, self.state, self._cuda_kernels)
        else:
            for bucket in active_buckets:
                update_bucket_(bucket, self.state, self._cuda_kernels)
        for position in by_layer:
            layers.update_counts[position] += 1
        if self._estimate:
            estimator.after_step(by_layer, self.state, before, embeddings)
        self._begin_step(self._step_count + 1)
        return loss

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self):
        """torch's layout plus a ``dropmuon`` section in the first param group (step, sampler,
        layers and statistics; :mod:`dropmuon.checkpoint`); loads with
        ``torch.load(weights_only=True)``. It is the same on every data-parallel rank, so it
        does not depend on the world size: save on one rank, load on all of any world size.
        Every parameter has its state from construction on (zeros), so every checkpoint holds
        the same keys. With FSDP2 save through torch.distributed.checkpoint
        (:mod:`dropmuon.distributed.fsdp`)."""
        truncation.end_interrupted_pass()
        state = super().state_dict()
        state["param_groups"][0]["dropmuon"] = checkpoint.section(self._layers, self._step_count)
        return state

    def load_state_dict(self, state_dict) -> None:
        """Restores a checkpoint written by :meth:`state_dict` (or by dropmuon 0.1, whose
        checkpoints held one param group per layer), validating it against this optimizer
        first: a different model, partition, norm assignment or sampler raises ValueError and
        changes nothing. A checkpoint written under another world size loads as is (see
        :meth:`state_dict`). Its ``param_names`` replace this optimizer's, as in torch."""
        state_dict = checkpoint.upgraded(state_dict, len(self.param_groups))
        layers = self._layers
        if layers.pending:  # the checkpoint's layers are taken first: undone if it is refused
            before = layers.snapshot(), {p: self.state[p] for p in layers.params()}
        try:
            saved = checkpoint.saved_layers(state_dict, layers) if layers.pending else None
            if saved is not None:
                self._layers_changed(layers.use_saved_layers(*saved, self._step_count))
            checked = checkpoint.checked(state_dict, layers, self.state)
        except (ValueError, TypeError, KeyError):
            if "before" in locals():  # a refused checkpoint changes nothing
                layers.restore(before[0])
                self.state.update(before[1])
                self._forward.prepare(layers)
            raise
        super().load_state_dict(state_dict)
        self.param_groups[0].pop("dropmuon", None)  # torch copies the saved groups' keys
        self.state.update(checked.kept)
        layers.load(checked)
        self._forward.checked_cutoffs.clear()
        initialize_state(layers.params_and_norms(), self.state)  # older checkpoints
        self._begin_step(int(checked.section["step"]))

    # -- copies and pickles -----------------------------------------------------------------------

    def __getstate__(self):
        """What a copy needs to continue the same trajectory: torch.optim's own state (step hooks
        are left out, as torch does) and DropMuon's; the forward hooks' side is made anew. After
        the first forward a copy holds the layers without their modules
        (:meth:`LayerBook.__getstate__`)."""
        if getattr(self, "_sharded", None) is not None:
            raise TypeError(
                "a DropMuon over FSDP2-sharded parameters cannot be copied or pickled: save it "
                "with torch.distributed.checkpoint (see dropmuon.distributed.fsdp)"
            )
        return {key: self.__dict__[key] for key in _PICKLED if key in self.__dict__}

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # options added since the optimizer was pickled
            for key, value in GROUP_DEFAULTS.items():
                group.setdefault(key, value)
        if "_layers" in self.__dict__:  # torch's load_state_dict replaces the groups
            self._layers.groups = self.param_groups
        if "_layers" in state:  # a copy (not torch's load_state_dict): new hooks
            self._watch_forwards()


def _given_groups(params) -> tuple[nn.Module | None, list]:
    """The model, if ``params`` is one, and the groups to give torch.optim (checked)."""
    if isinstance(params, nn.Module):
        return params, module_groups(params)
    if isinstance(params, Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors "
            f"or dicts, but got {torch.typename(params)}"
        )
    given = list(params)
    if given and isinstance(given[0], dict):
        check_layer_keys(given)
        for g_index, group in enumerate(given):
            check_group_keys(group, g_index)
    return None, given


# What DropMuon.__getstate__ keeps: torch.optim's state and DropMuon's own (the forward hooks'
# side, tied to this process, is made anew by __setstate__).
_PICKLED = (
    "defaults", "state", "param_groups", "_built", "_layers", "_diagnostics", "_estimate",
    "_nonfinite", "_cuda_kernels", "_step_count", "_sharded",
)  # fmt: skip


class Muon(DropMuon):
    """Muon: :class:`DropMuon` with ``sampling="full"`` (every layer, every step). With the
    same hyperparameters it follows torch.optim.Muon's trajectory on 2-D weights, and it also
    handles conv kernels (flattened) and vectors (``fallback``). It never changes
    ``requires_grad``."""

    def __init__(self, params, lr=GROUP_DEFAULTS["lr"], **kwargs) -> None:
        for key in ("sampling", "tau", "total_steps", "shift_strength"):
            if key in kwargs:
                raise TypeError(f"Muon always updates every layer; '{key}' does not apply")
        super().__init__(params, lr=lr, sampling="full", **kwargs)
