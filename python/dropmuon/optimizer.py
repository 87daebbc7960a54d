"""The DropMuon optimizer (and Muon, its full-sampling special case).

Each step updates only the *active* layers: for the cutoff distributions, the layers from a
sampled cutoff up to the output. After every step a post-hook draws the next step's active
layers and sets ``requires_grad`` so that only their parameters need gradients: the next
backward then stops at the cutoff by itself (no input- or weight-gradient work, and no saved
activations, below it). Frozen layers keep their parameters and optimizer state untouched.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import ops
from .partition import (
    FirstForwardTrace,
    Layer,
    check_norms,
    module_layers,
    param_role,
    resolve_norm,
    set_trainable,
)
from .sampling import LayerSampler, mask_from_user_sampler

STATE_VERSION = 1
SMOOTHNESS_POWER_ITERATIONS = 20
# The dtypes of the C kernels (spectral, sign, column, row, frobenius); AdamW takes any float.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


class DropMuon(Optimizer):
    r"""Drop-Muon (Gruntkowska et al., arXiv 2510.02239): Muon-style layer-wise updates of the
    layers from a random cutoff up to the output, with backprop truncated at the cutoff.

    Use it like any ``torch.optim`` optimizer, passing the model itself so that it can find the
    layers (see :mod:`dropmuon.partition`)::

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

    With other machinery:

    - Data parallel: every rank draws the same layers without communicating; DDP needs
      ``find_unused_parameters=True`` and no ``static_graph``. :func:`dropmuon.distributed.
      wrap_ddp` sets that up and can all-reduce only the active layers; checkpoints do not
      depend on the world size (:mod:`dropmuon.distributed`).
    - ``torch.compile`` of the model (before or after building the optimizer): each set of
      active layers is one graph, since autograd's graph depends on which parameters require
      grad. Cutoff samplings give at most ``num_layers + 1`` graphs (the extra one is the first
      forward, which runs the layer-ordering hooks; under compilation it computes every
      gradient and the step drops those of frozen layers), ``tau_nice`` up to
      ``C(num_layers, tau) + 1``. Raise ``torch._dynamo.config.recompile_limit`` (8 by default)
      above that, or Dynamo gives up and runs the model eagerly. :meth:`step` runs eagerly.
    - Mixed precision: autocast needs nothing; bfloat16 parameters keep bfloat16 momentum in
      its own storage, and gradients are only read. ``torch.amp.GradScaler.step`` skips
      :meth:`step` when it finds Inf/NaN, and then nothing of DropMuon moves: the step
      counter, the sampler and the frozen layers stay, so the retried step updates the same
      layers.

    Args:
        params: an ``nn.Module`` (layers found automatically, ordered by the first forward pass),
            an iterable of parameters or of (name, parameter) pairs such as
            ``model.named_parameters()`` (one layer each, in the given order), or param groups
            (dicts); a group's ``"layer"`` (int) says which layer it belongs to (layers are
            ordered by that value, input first; groups without it are one layer each, in order),
            and its ``"norm"`` (default ``"auto"``) overrides the norm of all its parameters.
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
            (L0, L1)-smoothness radius (notes section 4; ``lr = 1`` is the theory's step).
        L0, L1: the adaptive radius' constants (per group; defaults 1.0 and 0.0).
        sampling: ``"uniform"`` (default), ``"full"`` (Muon), ``"custom"`` (with
            ``probabilities``), ``"tau_nice"`` (with ``tau``), ``"epoch_shift"`` (with
            ``total_steps`` or :meth:`set_progress`), ``"cost_optimal"`` (from online
            smoothness estimates), a list of cutoff probabilities (same as ``"custom"``), or a
            sampler object (see :mod:`dropmuon.sampling`).
        tau: layers per step for ``"tau_nice"``.
        seed: key of the counter-based layer sampler; the same seed gives the same layers at
            the same step on every process and after a resume (default 0).
        total_steps: ``"epoch_shift"``: training length, so that progress = step / total_steps.
        shift_strength: ``"epoch_shift"``: how strongly progress tilts the cutoff distribution.
        fallback: norm for vectors (biases, norm gains): ``"sign"`` (default; the l_inf sharp
            operator) or ``"adamw"`` (the "Muon for matrices, AdamW for the rest" setup).
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
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients="muon",
        ns_steps: int | None = 5,
        eps: float = 1e-7,
        adjust_lr_fn: str | None = None,
        ns_precision: str = "bfloat16",
        radius: str = "fixed",
        L0: float = 1.0,
        L1: float = 0.0,
        sampling="uniform",
        tau: int | None = None,
        seed: int = 0,
        total_steps: int | None = None,
        shift_strength: float = 4.0,
        fallback: str = "sign",
        norms: dict[str, str] | None = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        nonfinite: str = "raise",
        estimate_smoothness: bool | None = None,
        smoothness_beta: float = 0.9,
    ) -> None:
        _check_hyperparameters(
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
        )
        ops.ns_schedule(ns_coefficients, ns_steps)  # validates
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if not 0.0 <= smoothness_beta < 1.0:
            raise ValueError(f"smoothness_beta must be in [0, 1), got {smoothness_beta!r}")
        self._role_norms = check_norms(norms, fallback)
        self._fallback = fallback
        lr_value = float(lr)
        if adamw_lr is not None and not 0.0 <= adamw_lr < math.inf:
            raise ValueError(f"Invalid learning rate: {adamw_lr}")
        if adamw_lr is not None and lr_value == 0.0 and adamw_lr != 0.0:
            raise ValueError("adamw_lr is kept as a ratio to lr, which needs lr > 0")
        defaults = dict(
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
            norm="auto",
            adamw_lr_ratio=1.0 if adamw_lr is None else adamw_lr / lr_value,
            betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
        )

        self._layers, groups, self._param_names = self._build_layers(params)
        super().__init__(groups, defaults)
        self._num_layers = len({g["layer"] for g in self.param_groups})
        for group in self.param_groups:
            _check_group(group)

        self._nonfinite = nonfinite
        self._step_count = 0
        self.update_counts = [0] * self._num_layers
        self.skipped_nonfinite = [0] * self._num_layers
        self._smoothness_beta = smoothness_beta
        self.sampler = self._make_sampler(sampling, tau, seed, total_steps, shift_strength)
        cost_optimal = getattr(self.sampler, "kind", None) == "cost_optimal"
        if estimate_smoothness is False and cost_optimal:
            raise ValueError("sampling='cost_optimal' needs estimate_smoothness")
        self._estimate = cost_optimal if estimate_smoothness is None else bool(estimate_smoothness)
        self.smoothness: list[float | None] = [None] * self._num_layers
        self._last_step_norm: list[float | None] = [None] * self._num_layers

        # Step 0's layers are drawn now; with a module, the first forward orders the layers and
        # freezes each as it is reached (the registration order may differ from the real one).
        self._mask = self._draw(0)
        self._trace = None
        if any(layer.module is not None for layer in self._layers):
            self._trace = FirstForwardTrace(self._layers, self._freeze_during_trace)
        else:
            self._apply_mask()
        self._assign_norms()
        self._check_params()
        self.register_step_post_hook(_sample_next_layers)

    # ------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _build_layers(params):
        """(layers, param groups, names) from a module, a parameter list or group dicts."""
        if isinstance(params, nn.Module):
            layers = module_layers(params)
            groups = [
                {"params": [p for _, p in layer.params], "layer": layer.index} for layer in layers
            ]
            names = {id(p): n for layer in layers for n, p in layer.params}
            return layers, groups, names
        if isinstance(params, Tensor):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or "
                f"dicts, but got {torch.typename(params)}"
            )
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        if all(isinstance(item, Tensor) or _is_named(item) for item in items):
            items = [{"params": [p]} for p in items]
        if not all(isinstance(item, dict) for item in items):
            raise TypeError(
                "params must be a module, parameters, (name, parameter) pairs, or param group "
                "dicts, not a mix"
            )
        with_layer = ["layer" in g for g in items]
        if any(with_layer) and not all(with_layer):
            raise ValueError("either every param group has a 'layer' index or none does")
        groups, layers_by_index, given_names = [], {}, []
        for g_index, group in enumerate(items):
            group = dict(group)
            entries = group["params"]
            entries = [entries] if isinstance(entries, Tensor) or _is_named(entries) else entries
            entries = list(entries)
            named = [_is_named(e) for e in entries]
            given_names.append([e[0] if n else None for e, n in zip(entries, named)])
            group["params"] = [e[1] if n else e for e, n in zip(entries, named)]
            layer_key = group.get("layer", g_index)
            if not isinstance(layer_key, int) or isinstance(layer_key, bool):
                raise ValueError(
                    f"param group {g_index}: 'layer' must be an int, got {layer_key!r}"
                )
            if len({id(p) for p in group["params"]}) != len(group["params"]):
                # torch only warns; here the parameter would be updated twice per step.
                raise ValueError(
                    f"param group {g_index} is a parameter group with duplicate parameters"
                )
            for p in group["params"]:
                if isinstance(p, Tensor) and not p.requires_grad:
                    raise ValueError(
                        f"param group {g_index} holds a parameter that does not require grad; "
                        "DropMuon sets requires_grad itself, so leave frozen parameters out"
                    )
            groups.append(group)
            layers_by_index.setdefault(layer_key, []).append(g_index)
        flat = [n is not None for names_ in given_names for n in names_]
        if any(flat) and not all(flat):
            raise ValueError(
                "all optimizer params should be with/without names. Some param names are missing"
            )
        # Layers ordered by their 'layer' value, renumbered 0..b-1.
        ranks = {key: rank for rank, key in enumerate(sorted(layers_by_index))}
        layers = [Layer(rank, f"layer {key}") for key, rank in ranks.items()]
        names = {}
        for g_index, group in enumerate(groups):
            rank = ranks[group.get("layer", g_index)]
            group["layer"] = rank
            for p_index, p in enumerate(group["params"]):
                name = given_names[g_index][p_index] or f"param_groups[{g_index}][{p_index}]"
                names[id(p)] = name
                layers[rank].params.append((name, p))
        return layers, groups, names

    def _make_sampler(self, sampling, tau, seed, total_steps, shift_strength):
        if isinstance(sampling, str):
            return LayerSampler(
                sampling,
                self._num_layers,
                seed=seed,
                tau=tau,
                total_steps=total_steps,
                shift_strength=shift_strength,
            )
        if isinstance(sampling, (list, tuple, Tensor)):
            probabilities = sampling.tolist() if isinstance(sampling, Tensor) else sampling
            return LayerSampler("custom", self._num_layers, seed=seed, probabilities=probabilities)
        if callable(getattr(sampling, "sample", None)):
            return sampling
        raise ValueError(
            "sampling must be a name, a list of cutoff probabilities, or an object with "
            f"sample(step, num_layers); got {sampling!r}"
        )

    def _assign_norms(self) -> None:
        """Each parameter's norm, from its group's "norm" or its role (needs the final order:
        the head is the last layer)."""
        last = self._num_layers - 1
        for group in self.param_groups:
            layer = self._layers[self._layer_index(group)]
            norms = []
            for p in group["params"]:
                if group["norm"] != "auto":
                    norms.append(group["norm"])
                else:
                    role = param_role(layer, p, group["layer"] == last)
                    norms.append(resolve_norm(role, self._role_norms, self._fallback))
            group["param_norms"] = norms

    def _check_params(self) -> None:
        """Rejects, at construction, the parameters no norm can update (see the class docs)."""
        for group in self.param_groups:
            for p, norm in zip(group["params"], group["param_norms"]):
                name = self._param_names[id(p)]
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

    def _layer_index(self, group) -> int:
        """The construction index of a group's layer (the position may differ after a trace)."""
        p = group["params"][0]
        return next(layer.index for layer in self._layers if any(q is p for _, q in layer.params))

    def add_param_group(self, param_group) -> None:
        if hasattr(self, "_num_layers"):
            raise RuntimeError(
                "DropMuon's layers are fixed at construction; build a new optimizer to add "
                "parameters"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------------------------------
    # Sampling and freezing
    # ------------------------------------------------------------------------------------------

    def _draw(self, step: int) -> list[bool]:
        if isinstance(self.sampler, LayerSampler):
            smoothness = None
            if self.sampler.kind == "cost_optimal" and all(v is not None for v in self.smoothness):
                smoothness = self.smoothness
            return self.sampler.sample(step, smoothness)
        return mask_from_user_sampler(self.sampler, step, self._num_layers)

    def _freeze_during_trace(self, layer: Layer, position: int) -> None:
        if torch.compiler.is_compiling():
            # Inside a graph being traced, requires_grad cannot change (it would break the
            # graph, and Dynamo then leaves the whole model uncompiled). The first step then
            # computes every gradient, and the step drops those of the frozen layers.
            return
        for _, p in layer.params:
            set_trainable(p, self._mask[position])
            if not self._mask[position]:
                p.grad = None

    def _finish_trace(self) -> None:
        """Adopts the first forward's order (once), then freezes by it."""
        if self._trace is None:
            return
        order = self._trace.finish()
        self._trace = None
        position = {index: pos for pos, index in enumerate(order)}
        for group in self.param_groups:
            group["layer"] = position[self._layer_index(group)]
        self._assign_norms()
        self._apply_mask()

    def _apply_mask(self) -> None:
        """requires_grad = active, for every managed parameter; frozen ones lose stale grads."""
        for group in self.param_groups:
            active = self._mask[group["layer"]]
            for p in group["params"]:
                set_trainable(p, active)
                if not active:
                    p.grad = None

    def set_progress(self, progress: float) -> None:
        """Tells ``epoch_shift`` sampling the fraction of training done, in [0, 1]; takes effect
        from the next draw (the layers of the step about to run are already fixed)."""
        if not isinstance(self.sampler, LayerSampler):
            raise TypeError("set_progress applies to the built-in samplers")
        self.sampler.set_progress(progress)

    def unfreeze(self) -> None:
        """Sets requires_grad back to True on every managed parameter (e.g. before handing the
        model to other code); the next step's draw freezes again."""
        for group in self.param_groups:
            for p in group["params"]:
                set_trainable(p, True)

    # ------------------------------------------------------------------------------------------
    # Introspection
    # ------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self._num_layers

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

    def layer_names(self) -> list[str]:
        names = [""] * self._num_layers
        for group in self.param_groups:
            names[group["layer"]] = self._layers[self._layer_index(group)].name
        return names

    # ------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Updates the active layers; the post-hook then draws the next step's layers."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._finish_trace()

        # Active parameters with gradients, by layer.
        by_layer: dict[int, list[tuple[dict, int, Tensor]]] = defaultdict(list)
        for group in self.param_groups:
            if not self._mask[group["layer"]]:
                continue
            checked = False
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if not checked:  # a scheduler or the user may have changed the group since
                    _check_step_hyperparameters(group)
                    checked = True
                _check_grad(p, self._param_names[id(p)])
                by_layer[group["layer"]].append((group, index, p))
        self._screen_nonfinite(by_layer)
        if self._estimate:
            self._update_smoothness_before(by_layer)
            before = {id(p): p.detach().clone() for items in by_layer.values() for _, _, p in items}

        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        for items in by_layer.values():
            for group, index, p in items:
                norm = group["param_norms"][index]
                key = (norm, tuple(p.shape), p.dtype, p.device, _group_key(group, norm))
                buckets[key].append((group, p))
        for (norm, *_), members in buckets.items():
            group = members[0][0]
            params = [p for _, p in members]
            if norm == "adamw":
                self._adamw(group, params)
            else:
                self._sharp_update(group, norm, params)

        for layer in by_layer:
            self.update_counts[layer] += 1
        if self._estimate:
            self._update_smoothness_after(by_layer, before)
        return loss

    def _screen_nonfinite(self, by_layer) -> None:
        """Rejects NaN/Inf gradients before anything is modified (one check per parameter)."""
        items = [(layer, p) for layer, entries in by_layer.items() for _, _, p in entries]
        if not items:
            return
        # A sum is NaN/Inf when an element is, and costs a fraction of isfinite().all(); it can
        # also overflow on finite values, so a non-finite sum is confirmed element by element.
        sums = torch.stack([p.grad.sum(dtype=torch.float32).cpu() for _, p in items]).tolist()
        bad_layers = {}
        for (layer, p), total in zip(items, sums):
            if not math.isfinite(total) and not torch.isfinite(p.grad).all():
                bad_layers.setdefault(layer, self._param_names[id(p)])
        for layer, name in bad_layers.items():
            if self._nonfinite == "raise":
                raise RuntimeError(
                    f"DropMuon: non-finite gradient in parameter '{name}' (layer {layer}, "
                    f"{self.layer_names()[layer]}); nothing was updated. Pass nonfinite='skip' "
                    "to skip such layers instead."
                )
            self.skipped_nonfinite[layer] += 1
            del by_layer[layer]

    def _sharp_update(self, group, norm: str, params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                # Row-major whatever p's layout: the kernels update (rows x cols) matrices in
                # place, and a channels_last buffer would not be one.
                state["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.contiguous_format
                )
            elif not state["momentum_buffer"].is_contiguous():  # e.g. from an older checkpoint
                state["momentum_buffer"] = state["momentum_buffer"].contiguous()
            bufs.append(state["momentum_buffer"])
        # Parameters stored otherwise (channels_last conv kernels, transposed views) are updated
        # through a row-major copy that is written back.
        work = [p if p.is_contiguous() else p.contiguous() for p in params]
        adjust = group["adjust_lr_fn"] or "original"
        ops.muon_update_(
            work,
            grads,
            bufs,
            lr=float(group["lr"]),
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            norm=norm,
            schedule=ops.ns_schedule(group["ns_coefficients"], group["ns_steps"]),
            eps=group["eps"],
            adjust_lr_fn=adjust if norm == "spectral" else "none",
            ns_precision=group["ns_precision"],
            radius=group["radius"],
            L0=group["L0"],
            L1=group["L1"],
        )
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)

    def _adamw(self, group, params: list[Tensor]) -> None:
        """AdamW (torch.optim.AdamW's arithmetic) for the parameters on the fallback."""
        lr = float(group["lr"]) * group["adamw_lr_ratio"]
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"].item()
            p.mul_(1 - lr * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            bias1, bias2 = 1 - beta1**step, 1 - beta2**step
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(group["adamw_eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)

    # ------------------------------------------------------------------------------------------
    # Smoothness estimates (cost_optimal sampling)
    # ------------------------------------------------------------------------------------------

    def _update_smoothness_before(self, by_layer) -> None:
        """Secant estimate for layers updated at their previous active step."""
        for layer, items in by_layer.items():
            numerator, complete = 0.0, self._last_step_norm[layer] is not None
            for group, index, p in items:
                previous = self.state[p].get("prev_grad")
                if previous is None:
                    complete = False
                    continue
                norm = _geometry(group["param_norms"][index])
                numerator += _dual_norm(p.grad - previous, norm)
            if complete and self._last_step_norm[layer] > 0:
                estimate = numerator / self._last_step_norm[layer]
                old = self.smoothness[layer]
                beta = self._smoothness_beta
                self.smoothness[layer] = (
                    estimate if old is None else beta * old + (1 - beta) * estimate
                )

    def _update_smoothness_after(self, by_layer, before) -> None:
        for layer, items in by_layer.items():
            step_norm = 0.0
            for group, index, p in items:
                norm = _geometry(group["param_norms"][index])
                step_norm = max(step_norm, _primal_norm(p.detach() - before[id(p)], norm))
                state = self.state[p]
                if "prev_grad" not in state:
                    state["prev_grad"] = torch.empty_like(p.grad)
                state["prev_grad"].copy_(p.grad)
            self._last_step_norm[layer] = step_norm

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------

    def state_dict(self):
        """torch's layout (``state``, ``param_groups``; ``momentum_buffer``, AdamW's ``exp_avg``,
        ``exp_avg_sq``, ``step``) plus a ``dropmuon`` section: step counter, sampler, layer
        names and statistics. Only tensors, numbers, strings, lists and dicts: it loads with
        ``torch.load(..., weights_only=True)``.

        The state is the same on every data-parallel rank (DropMuon keeps a full replica, and
        every rank draws the same layers), so a checkpoint does not depend on the world size:
        save it on one rank, load it on every rank of any world size (``world_size`` is
        recorded for information only; see :mod:`dropmuon.distributed`)."""
        state = super().state_dict()
        sampler_state = self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None
        state["dropmuon"] = dict(
            version=STATE_VERSION,
            step=self._step_count,
            num_layers=self._num_layers,
            layer_names=self.layer_names(),
            sampler=sampler_state,
            update_counts=list(self.update_counts),
            skipped_nonfinite=list(self.skipped_nonfinite),
            smoothness=[-1.0 if v is None else float(v) for v in self.smoothness],
            last_step_norm=[-1.0 if v is None else float(v) for v in self._last_step_norm],
            world_size=_world_size(),
        )
        return state

    def load_state_dict(self, state_dict) -> None:
        """Restores a checkpoint written by :meth:`state_dict`, validating it against this
        optimizer first: a different model, partition, norm assignment or sampler raises
        ValueError and changes nothing. A checkpoint written under another world size loads
        as is (see :meth:`state_dict`)."""
        extra = state_dict.get("dropmuon") if isinstance(state_dict, dict) else None
        if extra is None:
            raise ValueError("not a DropMuon checkpoint: it has no 'dropmuon' section")
        if extra.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported DropMuon checkpoint version {extra.get('version')!r}")
        missing = [key for key in _CHECKPOINT_KEYS if key not in extra]
        if missing or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError(
                f"incomplete DropMuon checkpoint: missing {missing or ['state/param_groups']}"
            )
        if extra["num_layers"] != self._num_layers:
            raise ValueError(
                f"checkpoint has {extra['num_layers']} layers, this optimizer "
                f"{self._num_layers}: a different model or partition"
            )
        for key in ("update_counts", "skipped_nonfinite", "smoothness", "last_step_norm"):
            if len(extra[key]) != self._num_layers:
                raise ValueError(
                    f"checkpoint's {key} has {len(extra[key])} entries, not one per layer"
                )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"checkpoint has {len(saved_groups)} param groups, this optimizer "
                f"{len(self.param_groups)}: a different model or partition"
            )
        if sorted({g.get("layer") for g in saved_groups}) != list(range(self._num_layers)):
            raise ValueError("checkpoint's layer indices are not 0..num_layers-1")
        for g_index, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(mine["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param group {g_index} has {len(saved['params'])} parameters in the "
                    f"checkpoint and {len(mine['params'])} here: a different model or partition"
                )
            if saved.get("param_norms") != mine["param_norms"]:
                raise ValueError(
                    f"param group {g_index} has norms {saved.get('param_norms')} in the "
                    f"checkpoint and {mine['param_norms']} here: a different configuration"
                )
            if self._trace is None and saved.get("layer") != mine["layer"]:
                raise ValueError(
                    f"param group {g_index} is layer {saved.get('layer')} in the checkpoint and "
                    f"{mine['layer']} here: a different partition"
                )
            for p_index, p in enumerate(mine["params"]):
                shape = saved.get("param_shapes", [None] * len(mine["params"]))[p_index]
                if shape is not None and tuple(shape) != tuple(p.shape):
                    raise ValueError(
                        f"parameter {self._param_names[id(p)]} has shape {tuple(p.shape)} here "
                        f"and {tuple(shape)} in the checkpoint: a different model"
                    )
        # Each parameter's saved state must fit it, or the first step would fail half-way.
        saved_ids = [key for saved in saved_groups for key in saved["params"]]
        mine = [p for group in self.param_groups for p in group["params"]]
        for key, p in zip(saved_ids, mine):
            entry = state_dict["state"].get(key, {})
            name = self._param_names[id(p)]
            adamw = [k for k in ("step", "exp_avg", "exp_avg_sq") if k in entry]
            if 0 < len(adamw) < 3:
                raise ValueError(f"the checkpoint's AdamW state of {name} is incomplete: {adamw}")
            for k, value in entry.items():
                if k != "step" and isinstance(value, Tensor) and value.shape != p.shape:
                    raise ValueError(
                        f"the checkpoint's {k} of {name} has shape {tuple(value.shape)}, the "
                        f"parameter {tuple(p.shape)}: a corrupted checkpoint"
                    )
        # The sampler is restored on a copy first, so that a mismatch changes nothing.
        sampler = self.sampler
        if extra["sampler"] is not None and isinstance(self.sampler, LayerSampler):
            sampler = copy.deepcopy(self.sampler)
            sampler.load_state_dict(extra["sampler"])
        elif extra["sampler"] is not None and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(extra["sampler"])  # a user sampler: its own checks

        super().load_state_dict(state_dict)
        self.sampler = sampler
        if self._trace is not None:  # the checkpoint's order replaces the first-forward trace
            self._trace.finish()
            self._trace = None
        self._step_count = int(extra["step"])
        self.update_counts = list(extra["update_counts"])
        self.skipped_nonfinite = list(extra["skipped_nonfinite"])
        self.smoothness = [None if v < 0 else v for v in extra["smoothness"]]
        self._last_step_norm = [None if v < 0 else v for v in extra["last_step_norm"]]
        self._mask = self._draw(self._step_count)
        self._apply_mask()

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in dict(
                ns_precision="bfloat16",
                radius="fixed",
                L0=1.0,
                L1=0.0,
                norm="auto",
                adamw_lr_ratio=1.0,
                betas=(0.9, 0.999),
                adamw_eps=1e-8,
            ).items():
                group.setdefault(key, value)


class Muon(DropMuon):
    """Muon: :class:`DropMuon` with ``sampling="full"`` (every layer, every step). With the
    same hyperparameters it follows torch.optim.Muon's trajectory on 2-D weights, and it also
    handles conv kernels (flattened) and vectors (``fallback``)."""

    def __init__(self, params, lr=1e-3, **kwargs) -> None:
        for key in ("sampling", "tau", "total_steps", "shift_strength"):
            if key in kwargs:
                raise TypeError(f"Muon always updates every layer; '{key}' does not apply")
        super().__init__(params, lr=lr, sampling="full", **kwargs)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _is_named(entry) -> bool:
    """A (name, parameter) pair, as model.named_parameters() yields."""
    return (
        isinstance(entry, tuple)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], Tensor)
    )


_CHECKPOINT_KEYS = (
    "step",
    "num_layers",
    "sampler",
    "update_counts",
    "skipped_nonfinite",
    "smoothness",
    "last_step_norm",
)


def _world_size() -> int:
    """The default process group's size, 1 outside torch.distributed."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


def _sample_next_layers(optimizer: DropMuon, args, kwargs) -> None:
    """Step post-hook: the next step's layers, frozen below the cutoff right away."""
    optimizer._step_count += 1
    optimizer._mask = optimizer._draw(optimizer._step_count)
    optimizer._apply_mask()


def _check_hyperparameters(
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
    if adjust_lr_fn is not None and adjust_lr_fn not in ["original", "match_rms_adamw"]:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
    if not 0.0 <= eps or not math.isfinite(eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if ns_precision not in ("native", "bfloat16"):
        raise ValueError(f"ns_precision must be 'native' or 'bfloat16', got {ns_precision!r}")
    if radius not in ("fixed", "adaptive"):
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


def _check_step_hyperparameters(group) -> None:
    """The checks of _check_group but the norm, repeated at each step (a few comparisons per
    group): an LR scheduler or the user may have written a bad value into the group since."""
    _check_hyperparameters(
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
    ops.ns_schedule(group["ns_coefficients"], group["ns_steps"])


def _check_grad(p: Tensor, name: str) -> None:
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


def _check_group(group) -> None:
    """The per-group checks (a group may override the defaults)."""
    _check_step_hyperparameters(group)
    if group["norm"] != "auto":
        check_norms({"matrix": group["norm"]}, "sign")
    group["param_shapes"] = [list(p.shape) for p in group["params"]]


def _group_key(group, norm: str) -> tuple:
    """The hyperparameters a fused update call shares: equal keys may share a call."""
    if norm == "adamw":
        return (id(group),)
    return (
        float(group["lr"]),
        group["weight_decay"],
        group["momentum"],
        group["nesterov"],
        ops.ns_schedule(group["ns_coefficients"], group["ns_steps"]),
        group["eps"],
        group["adjust_lr_fn"],
        group["ns_precision"],
        group["radius"],
        group["L0"],
        group["L1"],
    )


def _as_matrix(t: Tensor) -> Tensor:
    """t as the (rows x cols) matrix the kernels see: (size(0), numel / size(0)), 0-D as 1 x 1,
    and zero-size tensors included (reshape cannot infer -1 for them)."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    rows = t.shape[0]
    return t.reshape(rows, t.numel() // rows if rows else 0)


def _geometry(norm: str) -> str:
    """The norm whose dual and primal values the smoothness secant uses."""
    return "frobenius" if norm == "adamw" else norm


def _dual_norm(t: Tensor, norm: str) -> float:
    """||t||_* for the layer's norm: <t, sharp(t)> (nuclear norm for spectral, by NS)."""
    matrix = _as_matrix(t)
    _, dual = ops.sharp(
        matrix.float(),
        norm=norm,
        ns_coefficients="polar_express",
        ns_steps=8,
        ns_precision="native",
    )
    return float(dual)


def _primal_norm(t: Tensor, norm: str) -> float:
    """||t|| in the layer's norm (the largest singular value, by power iteration, for
    spectral)."""
    m = _as_matrix(t).double()
    if m.numel() == 0:
        return 0.0
    if norm == "spectral":
        v = torch.ones(m.shape[1], dtype=m.dtype, device=m.device)
        v[::2] = -0.5  # not orthogonal to typical top singular vectors; deterministic
        sigma = 0.0
        for _ in range(SMOOTHNESS_POWER_ITERATIONS):
            u = m @ v
            v = m.T @ u
            sigma = math.sqrt(float(v.norm()))
            if sigma == 0.0:
                return 0.0
            v = v / v.norm()
        return sigma
    if norm == "sign":
        return float(m.abs().max())
    if norm == "column":
        return float(m.norm(dim=0).max())
    if norm == "row":
        return float(m.norm(dim=1).max())
    return float(m.norm())


def describe(optimizer: DropMuon) -> str:
    """A table of the layer partition: position, name, activity, update count, P(cutoff), and
    each parameter's shape and norm (with the matrix a spectral update sees)."""
    trace = "registration (first forward not yet seen)" if optimizer._trace else "first forward"
    lines = [
        f"{type(optimizer).__name__}: {optimizer.num_layers} layers, ordered by {trace}; "
        f"sampling {optimizer.sampler!r}; step {optimizer.step_count}",
        f"{'layer':>5}  {'name':<24} {'next':<6} {'updates':>7}  {'P(cut)':>6}  parameters",
    ]
    probabilities = None
    if isinstance(optimizer.sampler, LayerSampler):
        probabilities = optimizer.sampler.distribution(optimizer.step_count).tolist()
    rows = defaultdict(list)
    for group in optimizer.param_groups:
        for p, norm in zip(group["params"], group["param_norms"]):
            view = ""
            if norm == "spectral":
                rows_, cols = (p.shape[0], p.numel() // max(p.shape[0], 1)) if p.dim() else (1, 1)
                view = f" as {rows_}x{cols}"
            name = optimizer._param_names[id(p)]
            rows[group["layer"]].append(f"{name} {tuple(p.shape)} {norm}{view}")
    names = optimizer.layer_names()
    for layer in range(optimizer.num_layers):
        chance = f"{probabilities[layer]:.3f}" if probabilities else "-"
        active = "active" if optimizer.active_layers[layer] else "frozen"
        params = "; ".join(rows[layer]) or "(none)"
        lines.append(
            f"{layer:>5}  {names[layer]:<24} {active:<6} {optimizer.update_counts[layer]:>7}  "
            f"{chance:>6}  {params}"
        )
    return "\n".join(lines)
