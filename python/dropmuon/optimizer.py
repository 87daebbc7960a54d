"""The DropMuon optimizer (and Muon, its full-sampling special case): construction, the
orchestration of a step, and the public properties.

Each step updates only the *active* layers: for the cutoff distributions, the layers from a
sampled cutoff up to the output. At the end of every step the next step's layers are drawn;
while each forward pass runs, the other layers' parameters do not require grad, so the backward
stops at the cutoff by itself (no input- or weight-gradient work, and no saved activations,
below it). Between forward passes every ``requires_grad`` flag is the user's own
(:mod:`dropmuon.layers.truncation`). Frozen layers keep their parameters and optimizer state
untouched.

Where the pieces live: the layers (:mod:`dropmuon.layers.partition`), the draw
(:mod:`dropmuon.layers.sampling`), the freezing (:mod:`dropmuon.layers.truncation`), the step math
(:mod:`dropmuon.step.update`, :mod:`dropmuon.step.adamw`), the estimates for ``cost_optimal``
(:mod:`dropmuon.layers.smoothness`), the checkpoint section (:mod:`dropmuon.checkpoint`), the checks
(:mod:`dropmuon.checks`), the names and defaults (:mod:`dropmuon.defaults`).

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

from collections import defaultdict
from itertools import chain

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import checkpoint
from .checks import (
    adamw_lr_ratio,
    check_grad,
    check_group,
    check_group_keys,
    check_group_norm,
    check_hyperparameters,
    check_no_duplicates,
    check_optimizer_options,
    check_param,
    nonfinite_layers,
)
from .defaults import (
    DEFAULT_FALLBACK,
    DEFAULT_SAMPLING,
    DEFAULT_SHIFT_STRENGTH,
    DEFAULT_SMOOTHNESS_BETA,
    GROUP_DEFAULTS,
    ROLES,
)
from .diagnostics import Diagnostics, warn_order_unknown, warn_unused_layers
from .distributed import fsdp
from .kernels import ops
from .layers import truncation
from .layers.partition import (
    FirstForwardTrace,
    Layer,
    Partition,
    assign_norms,
    check_layer_keys,
    check_norms,
    group_layers,
    module_groups,
    module_layers,
    param_names,
    resolve_norm,
)
from .layers.sampling import LayerSampler, draw, make_sampler, resized_sampler
from .layers.smoothness import SmoothnessEstimator
from .layers.truncation import ForwardFreeze
from .step import update

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

    With DDP, ``torch.compile`` and mixed precision: see this module's docstring
    (``help(dropmuon.optimizer)``).

    Args:
        params: an ``nn.Module``, an iterable of parameters or of (name, parameter) pairs such
            as ``model.named_parameters()``, or param groups (dicts). The layers are the modules
            that own the parameters, ordered by where the first forward pass first uses them;
            for parameters and groups the model is the one that first forward runs (until then
            one provisional layer). Groups that all carry a ``"layer"`` (int) say the layers
            themselves (ordered by that value, input first). A group's ``"norm"`` (default
            ``"auto"``) overrides the norm of all its parameters; a key that is a near miss of
            one DropMuon reads is a ValueError, other keys are kept. README "Layers".
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
        fallback: norm for vectors (biases, norm gains): ``"adamw"`` (default; the "Muon for
            matrices, AdamW for the rest" setup) or ``"sign"`` (the l_inf sharp operator, the
            paper's geometry; dropmuon 0.1's default, which moves every vector entry by the
            full lr at every step: a word-level language model then barely learns).
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
        estimate_smoothness: keep online per-layer smoothness estimates (secant
            ``sum_p ||G_p' - G_p||_* / max_p ||X_p' - X_p||`` between consecutive active steps,
            smoothed by ``smoothness_beta``). On by default for ``"cost_optimal"`` (which
            needs them); costs a copy of each gradient and one more sharp operator per step.
        smoothness_beta: EMA factor of the smoothness estimates (default 0.9).
        cuda_kernels: CUDA parameters use dropmuon's CUDA kernels (True) or the pure-PyTorch
            reference, torch's own CUDA products (False). Default None: the environment's
            ``DROPMUON_CUDA_KERNELS`` (``1``/``0``), else the reference until the kernels have
            passed on real hardware (:func:`dropmuon.kernels.ops.cuda_kernels_enabled`).
        fsdp_update: with FSDP2-sharded parameters, how the whole-matrix updates are formed:
            ``"owner"`` (default; each active matrix orthogonalized on one rank, two
            all-to-alls) or ``"all_gather"`` (every rank gathers and computes every update; the
            baseline). Ignored without sharded parameters. See :mod:`dropmuon.distributed.fsdp`.
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
        cuda_kernels: bool | None = None,
        fsdp_update: str = "owner",
    ) -> None:
        check_hyperparameters(
            lr, weight_decay, momentum, eps, adjust_lr_fn, ns_precision, radius, L0, L1,
            adamw_betas, adamw_eps,
        )  # fmt: skip
        ops.ns_schedule(ns_coefficients, ns_steps)  # validates
        truncation.end_interrupted_pass()  # the flags the model is read with are the user's
        check_optimizer_options(nonfinite, smoothness_beta, adamw_lr, lr, cuda_kernels)
        self._role_norms = check_norms(norms, fallback)
        self._fallback = fallback
        defaults = dict(
            GROUP_DEFAULTS,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            ns_steps=ns_steps,
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
            ns_precision=ns_precision,
            radius=radius,
            L0=L0,
            L1=L1,
            adamw_lr_ratio=adamw_lr_ratio(adamw_lr, lr),
            betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
        )

        # The param groups are the user's (a module stands for one named group); torch checks
        # and normalises them. The layers are a partition of the same parameters, beside them.
        model = params if isinstance(params, nn.Module) else None
        if model is not None:
            given = module_groups(model)
        else:
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
        self._built = False
        super().__init__(given, defaults)
        for g_index, group in enumerate(self.param_groups):
            check_group(group)
            check_group_norm(group)
            check_no_duplicates(group, g_index)
        self._param_names = param_names(self.param_groups)
        # Parameters or groups without "layer" keys: the layers are the modules that own them
        # in the model the first forward runs (found then, by _find_layers); until then the
        # parameters are one provisional layer.
        self._layers_pending = model is None and "layer" not in self.param_groups[0]
        self._layers_by_use = False  # the layers were found by the first forward (a model run)
        if model is not None:
            managed = {id(p) for group in self.param_groups for p in group["params"]}
            layers = module_layers(model, managed)
        elif self._layers_pending:
            layers = self._pending_layers()
        else:
            layers = group_layers(self.param_groups, self._param_names)
        self._partition = Partition.of(layers)
        self._model = model

        self._nonfinite = nonfinite
        self._step_count = 0
        self.update_counts = [0] * self.num_layers
        self.skipped_nonfinite = [0] * self.num_layers
        self._sampling = dict(
            sampling=sampling, seed=seed, tau=tau, total_steps=total_steps,
            shift_strength=shift_strength,
        )  # fmt: skip
        custom = isinstance(sampling, (list, tuple, Tensor)) or sampling == "custom"
        if self._layers_pending and custom:
            raise ValueError(
                "custom cutoff probabilities need the layers at construction, but these "
                "parameters' layers are found at the first forward (by the modules that "
                "own them): pass the model itself, or param groups with 'layer' keys"
            )
        self.sampler = self._make_sampler()
        cost_optimal = getattr(self.sampler, "kind", None) == "cost_optimal"
        if estimate_smoothness is False and cost_optimal:
            raise ValueError("sampling='cost_optimal' needs estimate_smoothness")
        self._estimate = cost_optimal if estimate_smoothness is None else bool(estimate_smoothness)
        self._smoothness = SmoothnessEstimator(self.num_layers, smoothness_beta, cuda_kernels)
        self._cuda_kernels = cuda_kernels
        self._diagnostics = Diagnostics()

        self._norms = self._assign_norms()
        for p in self._params():
            check_param(p, self.param_name(p), self.norm_of(p))
        self._sharded = fsdp.sharded_update(list(self._params()), self.param_name, fsdp_update)
        if self._sharded is not None and self._estimate:
            raise ValueError(
                "sampling='cost_optimal' and estimate_smoothness are not supported with "
                "FSDP2-sharded parameters: the estimates need whole gradients every step"
            )
        update.initialize_state(self._params_and_norms(), self.state)

        # Step 0's layers are drawn. With a module, the first forward orders the layers and
        # freezes each as it is reached (the registration order may differ from the real one).
        self._mask = self._draw(0)
        self._trace = None
        self._layer_order = "param groups"
        if model is not None:
            self._trace = FirstForwardTrace(self._partition.layers, self._model)
            self._layer_order = "registration (first forward not yet seen)"
        elif self._layers_pending:
            self._layer_order = PENDING_ORDER
        self._watch_forwards()
        self._built = True

    # -- parameters, layers, norms ----------------------------------------------------------------

    def _watch_forwards(self) -> None:
        """This optimizer's side of the forward hooks (see :mod:`dropmuon.layers.truncation`), armed
        with the coming step's freeze."""
        self._forward = ForwardFreeze(self, self._diagnostics)
        self._forward.managed = {id(p) for p in self._params()}
        self._forward.trace = self._trace
        self._forward.layers_pending = self._layers_pending
        truncation.watch(self._forward)
        self._set_forward_freeze()

    def _params(self):
        """Every managed parameter, in param-group order."""
        return (p for group in self.param_groups for p in group["params"])

    def _pending_layers(self) -> list[Layer]:
        """Every parameter in one provisional layer, until the first forward finds the layers."""
        return [Layer(0, PENDING_LAYER, [(self.param_name(p), p) for p in self._params()])]

    def _make_sampler(self):
        """The sampler over the current layers (while they are pending, one: a tau_nice tau
        is checked against the real count when they are found)."""
        options = dict(self._sampling)
        if self._layers_pending and isinstance(options["tau"], int):
            options["tau"] = min(options["tau"], self.num_layers)
        return make_sampler(options.pop("sampling"), self.num_layers, **options)

    def _layers_without_forward(self) -> None:
        """A step came before any module call found the layers (gradients set by hand, or a
        forward outside any nn.Module): one layer per parameter, in the order given."""
        params = list(self._params())
        self._use_layers(
            [Layer(i, self.param_name(p), [(self.param_name(p), p)]) for i, p in enumerate(params)]
        )
        self._layer_order = "param groups"
        if len(params) > 1 and getattr(self.sampler, "kind", None) != "full":  # order matters
            warn_order_unknown(len(params))

    def _layers_of_checkpoint(self, state_dict) -> None:
        """Loading into an optimizer whose layers are pending: the checkpoint's layers, unless
        it was written while pending too."""
        found = checkpoint.saved_layers(state_dict, list(self._params()), self.param_name)
        if found is not None:
            layers, order = found
            self._use_layers(layers)
            self._layer_order = order

    def _pending_snapshot(self) -> dict:
        """What _use_layers changes, to undo it when a checkpoint is refused."""
        keys = (
            "_layers_pending", "_partition", "_model", "update_counts", "skipped_nonfinite",
            "_smoothness", "sampler", "_norms", "_mask", "_layer_order",
        )  # fmt: skip
        return dict(
            attributes={key: self.__dict__[key] for key in keys},
            state={p: self.state[p] for p in self._params()},
        )

    def _use_layers(self, layers: list[Layer], model: nn.Module | None = None) -> None:
        """Pending layers become ``layers``: the sampler, the statistics, the norms and the
        coming step's draw follow (nothing was updated under the provisional ones that a
        different norm would need to keep)."""
        self._layers_pending = self._forward.layers_pending = False
        self._partition = Partition.of(layers)
        self._model = model
        self.update_counts = [0] * self.num_layers
        self.skipped_nonfinite = [0] * self.num_layers
        self._smoothness = SmoothnessEstimator(
            self.num_layers, self._smoothness.beta, self._cuda_kernels
        )
        self.sampler = self._make_sampler()
        before = self._norms
        self._norms = self._assign_norms()
        for p in self._params():
            check_param(p, self.param_name(p), self.norm_of(p))
            if (before[id(p)] == "adamw") != (self._norms[id(p)] == "adamw"):
                self.state[p] = {}
        update.initialize_state(self._params_and_norms(), self.state)
        self._mask = self._draw(self._step_count)

    def _find_layers(self, root: nn.Module) -> None:
        """Called by the forward hooks at the first forward of an optimizer built from
        parameters or groups without "layer" keys: its layers become the modules that own the
        parameters in ``root``, the model being run (wrappers such as DDP and torch.compile's
        unwrapped), each placed by where the forward first uses it, as for a model passed
        itself; a parameter no module owns is a layer of its own. The sampler, the statistics
        and step 0's draw follow."""
        model = _unwrapped(root)
        managed = {id(p) for p in self._params()}
        if not any(id(p) in managed for p in model.parameters()):
            return  # a module outside the model (a loss module, say): the model comes later
        owned_layers = module_layers(model, managed)
        owned = {id(p) for layer in owned_layers for _, p in layer.params}
        names = {id(p): n for layer in owned_layers for n, p in layer.params}
        given = param_names(self.param_groups)
        loose = [p for p in self._params() if id(p) not in owned]
        layers = owned_layers + [
            Layer(len(owned_layers) + i, given[id(p)], [(given[id(p)], p)])
            for i, p in enumerate(loose)
        ]
        user_named = {id(p) for g in self.param_groups if "param_names" in g for p in g["params"]}
        self._param_names = {k: given[k] if k in user_named else n for k, n in names.items()}
        self._param_names.update({id(p): given[id(p)] for p in loose})
        Partition.of(layers).rename(self._param_names)
        self._use_layers(layers, model)
        self._layers_by_use = True
        self._trace = self._forward.trace = FirstForwardTrace(self._partition.layers, model)
        self._layer_order = "registration (first forward not yet seen)"
        self._set_forward_freeze()

    def _params_and_norms(self):
        return ((p, self._norms[id(p)]) for p in self._params())

    def _assign_norms(self) -> dict[int, str]:
        return assign_norms(self.param_groups, self._partition, self._role_norms, self._fallback)

    def add_param_group(self, param_group) -> None:
        """Adds a param group, as torch.optim does (fine-tuning: parameters unfrozen later).
        With ``"layer"`` keys, a group joins the layer with its key or makes a new one; a group
        without one makes one new layer (a module-built optimizer gives each new parameter the
        layer of its module, or makes the module a layer). New layers of a module-built
        optimizer are placed by the next forward pass, traced again like the first; others go
        on top. The sampler follows the new number of layers (``"custom"`` probabilities cannot:
        ValueError). Nothing changes when the group is refused."""
        if not self._built:  # torch's constructor adds the groups given to it
            super().add_param_group(param_group)
            return
        truncation.end_interrupted_pass()
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        if isinstance(self.sampler, LayerSampler) and self.sampler.kind == "custom":
            raise ValueError(
                "sampling='custom' has one probability per layer, fixed at construction: build "
                "a new optimizer (or pass a sampler object) to add parameters"
            )
        if ("layer" in param_group) != ("layer" in self.param_groups[0]):
            raise ValueError("either every param group has a 'layer' index or none does")
        check_layer_keys([param_group])
        check_group_keys(param_group, len(self.param_groups))
        if self._model is not None and not self._layers_by_use:
            param_group = self._named_from_model(param_group)
        before = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group(group)
            check_group_norm(group)
            check_no_duplicates(group, before)
            names = param_names(self.param_groups)
            for p in group["params"]:
                for norm in self._possible_norms(group, p):
                    check_param(p, names[id(p)], norm)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        self._param_names = names
        self._forward.managed = {id(p) for p in self._params()}
        if self._layers_pending:  # the new parameters wait with the others for the first forward
            self._partition = Partition.of(self._pending_layers())
            self._norms = self._assign_norms()
            update.initialize_state(self._params_and_norms(), self.state)
            return
        before = [layer.position for layer in self._partition.layers]
        self._partition, new_layers = self._partition.extended(group, names, self._model)
        before += range(len(before), self.num_layers)  # new layers: appended, then moved
        if self._model is not None:
            # The new modules' places are unknown: the next forward orders every layer again.
            self._trace = FirstForwardTrace(self._partition.layers, self._model)
            self._layer_order = "registration (first forward not yet seen)"
        self._resize_statistics(len(new_layers))
        self._reorder_statistics(before)
        self.sampler = resized_sampler(self.sampler, self.num_layers)
        self._norms = self._assign_norms()
        update.initialize_state(self._params_and_norms(), self.state)
        self._forward.trace = self._trace
        truncation.watch(self._forward)  # Muon stops watching once ordered: a new trace needs it
        self._mask = self._draw(self._step_count)
        self._set_forward_freeze()

    def _possible_norms(self, group: dict, p: Tensor) -> set[str]:
        """Every norm ``p`` could get in ``group`` (its layer's place is not known yet)."""
        if group["norm"] != "auto":
            return {group["norm"]}
        if p.dim() < 2:
            return {resolve_norm("vector", self._role_norms, self._fallback)}
        return {resolve_norm(role, self._role_norms, self._fallback) for role in ROLES[:3]}

    def _named_from_model(self, param_group: dict) -> dict:
        """A group for a module-built optimizer, whose groups carry the parameters' names: the
        model's names for parameters given without; one that is not the model's is refused."""
        names = {id(p): n for n, p in self._model.named_parameters()}
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        named = []
        for entry in params:
            p = entry[1] if isinstance(entry, tuple) else entry
            if id(p) not in names:
                raise ValueError(
                    "add_param_group: a parameter that is not the model's (this optimizer was "
                    "built on the model, so each parameter's layer is its module)"
                )
            named.append((names[id(p)], p))
        return dict(param_group, params=named)

    def _resize_statistics(self, added: int) -> None:
        self.update_counts += [0] * added
        self.skipped_nonfinite += [0] * added
        self._smoothness.add_layers(added)

    # -- draws and freezing -----------------------------------------------------------------------

    def _draw(self, step: int) -> list[bool]:
        if self._layers_pending:  # one provisional layer: the real draw comes with the layers
            return [True] * self.num_layers
        return draw(self.sampler, step, self.num_layers, self._smoothness.smoothness)

    def _begin_step(self, step: int) -> None:
        """Makes ``step`` the coming step: its layers drawn, the freeze armed."""
        self._step_count = step
        self._mask = self._draw(step)
        self._forward.armed = True
        self._forward.forwards = 0
        self._set_forward_freeze()

    def _set_forward_freeze(self) -> None:
        """Tells the forward hooks what the coming step leaves out (while the first forward is
        traced, the layers are frozen as it reaches them instead)."""
        if self._trace is not None:
            self._forward.set_step(self._mask, [])
            return
        if getattr(self.sampler, "kind", None) == "full" and not self._layers_pending:
            # Muon: nothing to freeze once the layers are ordered, so no hooks to pay for.
            truncation.unwatch(self._forward)
            return
        frozen = [
            p
            for layer in self._partition.layers
            if not self._mask[layer.position]
            for _, p in layer.params
        ]
        cutoff = self._partition.by_position()[self.cutoff]
        watched = cutoff.module if self.cutoff > 0 else None  # nothing is frozen at cutoff 0
        self._forward.set_step(self._mask, frozen, watched, (self.cutoff, cutoff.name))

    def _finish_trace(self) -> None:
        """Adopts the traced order (once per trace), keeping each layer's statistics."""
        if self._trace is None:
            return
        self._check_params_still_registered()
        before = [layer.position for layer in self._partition.layers]
        self._mask = self._trace.finish(self._mask)
        if self._trace.unused:
            warn_unused_layers(self._trace.unused)
            # They come first; the warning above already says they get no gradient.
            self._diagnostics.warned_layers.update(range(len(self._trace.unused)))
        self._trace = self._forward.trace = None
        self._layer_order = "first forward"
        self._reorder_statistics(before)
        self._forward.checked_cutoffs.clear()  # keyed by position
        self._norms = self._assign_norms()  # the head is the last layer
        update.initialize_state(self._params_and_norms(), self.state)
        self._set_forward_freeze()

    def _traced_forward_ended(self) -> None:
        """Called by the forward hooks when the traced forward pass returns: its order is
        adopted at once, so that layer_names(), layer_of() and describe() are right before the
        first step (a later pass of the same step freezes by the final positions)."""
        if self._trace is not None and self._trace.positions:
            self._finish_trace()

    def _reorder_statistics(self, before: list[int]) -> None:
        """The per-position lists after the layers moved from positions ``before``."""
        moves = [(old, layer.position) for old, layer in zip(before, self._partition.layers)]

        def moved(values):
            out = list(values)
            for old, new in moves:
                out[new] = values[old]
            return out

        self.update_counts = moved(self.update_counts)
        self.skipped_nonfinite = moved(self.skipped_nonfinite)
        self._smoothness.smoothness = moved(self._smoothness.smoothness)
        self._smoothness.last_step_norm = moved(self._smoothness.last_step_norm)

    def _check_params_still_registered(self) -> None:
        """Raises (before the first step changes anything) when the model no longer holds the
        parameters the optimizer was built on: fully_shard, for one, registers new ones."""
        for layer in self._partition.layers:
            if layer.module is None:
                continue
            registered = {id(q) for q in layer.module.parameters(recurse=False)}
            for name, p in layer.params:
                if id(p) not in registered:
                    raise RuntimeError(
                        f"DropMuon: the model's parameter '{name}' is not the tensor this "
                        "optimizer was built on (fully_shard, or another wrapper, replaced "
                        "it): build the optimizer after fully_shard"
                    )

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

    @property
    def num_layers(self) -> int:
        return len(self._partition.layers)

    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far (the index of the step about to run)."""
        return self._step_count

    @property
    def active_layers(self) -> list[bool]:
        """Which layers the next step updates (position 0 is the input side)."""
        return list(self._mask)

    @property
    def cutoff(self) -> int:
        """The lowest layer the next step updates: backprop stops there."""
        return self._mask.index(True)

    @property
    def smoothness(self) -> list[float | None]:
        """Each layer's smoothness estimate (None until it has one; see ``estimate_smoothness``)."""
        return self._smoothness.smoothness

    @property
    def layer_order(self) -> str:
        """What ordered the layers: ``"first forward"``, ``"registration (first forward not yet
        seen)"``, ``"param groups"`` or ``"checkpoint"``."""
        return self._layer_order

    def layer_names(self) -> list[str]:
        """The layers' names by position (a module's name, a parameter's name for a layer of one
        tensor, or ``"layer <key>"`` for groups)."""
        return [layer.name for layer in self._partition.by_position()]

    def param_name(self, p: Tensor) -> str:
        """A managed parameter's name: from the module, ``param_names``, or
        ``param_groups[g][i]``."""
        return self._param_names[id(p)]

    def layer_of(self, p: Tensor) -> int:
        """The position of a managed parameter's layer (0 is the input side)."""
        return self._partition.layer_of[id(p)].position

    def norm_of(self, p: Tensor) -> str:
        """The norm a managed parameter is updated in (``spectral``, ``sign``, ..., ``adamw``)."""
        return self._norms[id(p)]

    def is_active(self, p: Tensor) -> bool:
        """Whether the next step updates ``p`` (its layer is active)."""
        layer = self._partition.layer_of[id(p)]
        if self._trace is not None:  # step 0: positions as the first forward reaches layers
            position = self._trace.positions.get(layer.construction_index)
            return True if position is None else self._mask[position]
        return self._mask[layer.position]

    # -- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Updates the active layers, then draws the next step's layers."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        truncation.end_interrupted_pass()  # outside any forward, none may be in progress
        if self._layers_pending:
            self._layers_without_forward()
            self._set_forward_freeze()
        self._finish_trace()
        by_layer, schedules = self._active_gradients()
        user_frozen = {
            layer.position
            for layer in self._partition.layers
            if not any(p.requires_grad for _, p in layer.params)
        }
        self._diagnostics.check_gradients(
            self._mask, by_layer, self.layer_names, self._step_count, user_frozen
        )
        froze = self._forward.armed and not all(self._mask)
        self._diagnostics.check_forward_seen(
            self._forward.forwards, froze, by_layer, self._step_count
        )
        by_layer = self._without_nonfinite(by_layer)
        before = self._smoothness.before_step(by_layer, self.state) if self._estimate else None
        buckets = update.buckets(chain(*by_layer.values()), schedules)
        if self._sharded is not None:
            self._sharded.update_(buckets, self.state, self._cuda_kernels)
        else:
            for bucket in buckets:
                update.update_bucket_(bucket, self.state, self._cuda_kernels)
        for layer in by_layer:
            self.update_counts[layer] += 1
        if before is not None:
            self._smoothness.after_step(by_layer, self.state, before)
        self._begin_step(self._step_count + 1)
        return loss

    def _active_gradients(self) -> tuple[dict[int, list], dict]:
        """The active parameters with gradients, by layer position, as (group, norm, param),
        checked; and each of their groups' Newton-Schulz schedule by ``id(group)``. As in
        torch.optim, a parameter without a gradient is left alone (whatever its
        requires_grad)."""
        by_layer: dict[int, list] = defaultdict(list)
        schedules = {}
        for group in self.param_groups:
            for p in group["params"]:
                position = self._partition.layer_of[id(p)].position
                if p.grad is None or not self._mask[position]:
                    continue
                if id(group) not in schedules:  # a scheduler or the user may have changed it
                    schedules[id(group)] = check_group(group)
                check_grad(p, self._param_names[id(p)])
                by_layer[position].append((group, self._norms[id(p)], p))
        return by_layer, schedules

    def _without_nonfinite(self, by_layer: dict[int, list]) -> dict[int, list]:
        """Raises on a NaN/Inf gradient before anything is modified (``nonfinite="raise"``), or
        leaves its layer out of the step and counts it (``"skip"``)."""
        any_rank = self._sharded.any_rank if self._sharded is not None else None
        bad_layers = nonfinite_layers(by_layer, self.param_name, any_rank)
        for layer, name in bad_layers.items():
            if self._nonfinite == "raise":
                raise RuntimeError(
                    f"DropMuon: non-finite gradient in parameter '{name}' (layer {layer}, "
                    f"{self.layer_names()[layer]}); nothing was updated. Pass nonfinite='skip' "
                    "to skip such layers instead."
                )
            self.skipped_nonfinite[layer] += 1
        return {layer: items for layer, items in by_layer.items() if layer not in bad_layers}

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self):
        """torch's layout plus a ``dropmuon`` section in the first param group
        (``state_dict()["param_groups"][0]["dropmuon"]``, where converters that keep only
        ``state`` and ``param_groups``, such as torch.distributed.checkpoint's, keep it too):
        step counter, sampler, layer names and statistics, and each parameter's layer, norm and
        shape (:mod:`dropmuon.checkpoint`); loads with ``torch.load(weights_only=True)``. It is
        the same on every data-parallel rank (a full replica, the same draws), so it does not
        depend on the world size: save on one rank, load on all of any world size. Every
        parameter has its state from construction on (zeros, as its first update would make
        it), so every checkpoint holds the same keys and torch.distributed.checkpoint never
        needs to step a fresh optimizer to create them. With FSDP2 the state tensors are
        DTensors: save through torch.distributed.checkpoint (:mod:`dropmuon.distributed.fsdp`)."""
        truncation.end_interrupted_pass()
        state = super().state_dict()
        per_group = [group["params"] for group in self.param_groups]
        state["param_groups"][0]["dropmuon"] = checkpoint.section(
            step=self._step_count,
            layer_names=self.layer_names(),
            sampler=self.sampler,
            update_counts=self.update_counts,
            skipped_nonfinite=self.skipped_nonfinite,
            estimator=self._smoothness,
            layer_order=self._layer_order,
            param_layers=[[self.layer_of(p) for p in params] for params in per_group],
            param_norms=[[self.norm_of(p) for p in params] for params in per_group],
            param_shapes=[[list(p.shape) for p in params] for params in per_group],
        )
        return state

    def load_state_dict(self, state_dict) -> None:
        """Restores a checkpoint written by :meth:`state_dict` (or by dropmuon 0.1, whose
        checkpoints held one param group per layer), validating it against this optimizer
        first: a different model, partition, norm assignment or sampler raises ValueError and
        changes nothing. A checkpoint written under another world size loads as is (see
        :meth:`state_dict`). Its ``param_names`` replace this optimizer's, as in torch."""
        state_dict = checkpoint.upgraded(state_dict, len(self.param_groups))
        before = self._pending_snapshot() if self._layers_pending else None
        try:
            if before is not None:
                self._layers_of_checkpoint(state_dict)
            extra = checkpoint.section_of(state_dict)
            positions_final = self._trace is None
            saved_positions = checkpoint.validate(
                state_dict,
                param_groups=self.param_groups,
                layer_of=self._partition.layer_of,
                num_layers=self.num_layers,
                param_name=self.param_name,
                positions_final=positions_final,
            )
            norms = self._norms_at(saved_positions)
            checkpoint.check_norms(state_dict, self.param_groups, norms, self.param_name)
            kept = checkpoint.state_kept_in_place(
                state_dict, list(self._params()), self.state, self.param_name
            )
            sampler = checkpoint.restored_sampler(self.sampler, extra["sampler"])
        except (ValueError, TypeError, KeyError):
            if before is not None:  # a refused checkpoint changes nothing
                self.__dict__.update(before["attributes"])
                self.state.update(before["state"])
                self._forward.layers_pending = True
            raise
        # The checkpoint's positions (equal to ours once ours are final): with the trace still
        # to come they place the per-layer statistics, and a checkpoint whose order is final
        # ends the trace (one written before any forward, such as accelerate's round trip,
        # leaves it to run).
        adopt = not positions_final and not str(extra.get("layer_order", "")).startswith(
            "registration"
        )
        super().load_state_dict(state_dict)
        self.param_groups[0].pop("dropmuon", None)  # torch copies the saved groups' keys
        if self._model is None:  # torch adopts the checkpoint's param_names
            self._param_names = param_names(self.param_groups)
            self._partition.rename(self._param_names)
        self.state.update(kept)
        for layer, position in saved_positions.items():
            layer.position = position
        if adopt:
            self._trace = self._forward.trace = None
            self._layer_order = "checkpoint"
        self._norms = self._assign_norms()
        self._forward.checked_cutoffs.clear()
        update.initialize_state(self._params_and_norms(), self.state)  # older checkpoints
        self.sampler = sampler
        self.update_counts = list(extra["update_counts"])
        self.skipped_nonfinite = list(extra["skipped_nonfinite"])
        checkpoint.restore_estimates(self._smoothness, extra)
        self._begin_step(int(extra["step"]))

    def _norms_at(self, positions: dict) -> dict[int, str]:
        """The norms the parameters would get with the layers at ``positions``."""
        current = {layer: layer.position for layer in self._partition.layers}
        try:
            for layer, position in positions.items():
                layer.position = position
            return self._assign_norms()
        finally:
            for layer, position in current.items():
                layer.position = position

    # -- copies and pickles -----------------------------------------------------------------------

    def __getstate__(self):
        """What a copy needs to continue the same trajectory: torch.optim's own state (defaults,
        state, param groups; step hooks are left out, as torch does) and DropMuon's (layers,
        sampler, counters, estimates). Maps keyed by ``id()`` and the forward hooks' side are
        made anew by :meth:`__setstate__`. The model is kept only while the first forward is
        still to be traced (it is needed then); after that a copy holds the layers without
        their modules, so pickling the optimizer does not pickle the model: such a copy skips
        the cutoff layer's input check, and ``add_param_group`` on it needs parameters in
        groups of their own (with ``"layer"`` keys if the original had them)."""
        if getattr(self, "_sharded", None) is not None:
            raise TypeError(
                "a DropMuon over FSDP2-sharded parameters cannot be copied or pickled: save it "
                "with torch.distributed.checkpoint (see dropmuon.fsdp)"
            )
        state = {key: self.__dict__[key] for key in _PICKLED if key in self.__dict__}
        keep_modules = self._trace is not None
        state["_layers"] = [
            Layer(
                layer.construction_index,
                layer.name,
                list(layer.params),
                layer.module if keep_modules else None,
                layer.position,
                layer.key,
            )
            for layer in self._partition.layers
        ]
        if not keep_modules:
            state["_model"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # options added since the optimizer was pickled
            for key, value in GROUP_DEFAULTS.items():
                group.setdefault(key, value)
        if "_layers" not in state:  # torch's load_state_dict sets state and groups only
            return
        self._partition = Partition.of(self.__dict__.pop("_layers"))
        self._param_names = param_names(self.param_groups)
        self._norms = self._assign_norms()
        if self._trace is not None:
            self._trace = FirstForwardTrace(
                self._partition.layers, self._model, self._trace.positions
            )
        self._watch_forwards()


def _unwrapped(module: nn.Module) -> nn.Module:
    """The model inside DDP's and torch.compile's wrappers."""
    for _ in range(8):
        if truncation.compiled(module):
            module = module._orig_mod
        elif isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        else:
            break
    return module


PENDING_LAYER = "(every parameter: the layers are found at the first forward)"
PENDING_ORDER = "pending (the layers are found at the first forward)"

# What DropMuon.__getstate__ keeps: torch.optim's state and DropMuon's own (the rest, keyed by
# id() or tied to this process's hooks, is rebuilt by __setstate__).
_PICKLED = (
    "defaults", "state", "param_groups",
    "_built", "_role_norms", "_fallback", "_model", "_nonfinite", "_step_count",
    "update_counts", "skipped_nonfinite", "sampler", "_estimate", "_smoothness",
    "_cuda_kernels", "_diagnostics", "_sharded", "_mask", "_trace", "_layer_order",
    "_layers_pending", "_layers_by_use", "_sampling",
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
