"""The optimizer's book of its layers: which parameters form each layer, in which order, with
which names and norms; the sampler and the coming step's draw over them; and the per-layer
statistics, which follow a layer when it moves.

One :class:`LayerBook` per optimizer, beside torch's param groups (the user's hyperparameters).
Its lifecycle, by how the optimizer was built:

- from a module: the module's layers at once, in registration order, until the first forward
  in grad mode is traced (:class:`.trace.FirstForwardTrace`) and its order adopted
  (:meth:`LayerBook.finish_trace`);
- from parameters or groups without ``"layer"`` keys: one provisional layer (*pending*) until
  the first forward finds the model (:meth:`LayerBook.find_layers`), which is then traced; or
  one layer per parameter if a step comes first (:meth:`LayerBook.layers_without_forward`), or
  the layers of a checkpoint loaded first (:meth:`LayerBook.use_saved_layers`);
- from groups with ``"layer"`` keys: the keys' layers, final at once.

Methods that change the norms return the parameters whose state must start again (their norm
moved between AdamW and the others); the optimizer owns the state and the forward hooks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import Tensor, nn

from ..checks import (
    check_grad,
    check_group,
    check_group_keys,
    check_group_norm,
    check_no_duplicates,
    check_param,
)
from ..defaults import ROLES
from ..diagnostics import Diagnostics, warn_order_unknown, warn_unused_layers
from .partition import (
    Layer,
    Partition,
    assign_norms,
    check_layer_keys,
    group_layers,
    model_layers,
    param_names,
    param_role,
    resolve_norm,
)
from .sampling import LayerSampler, draw, make_sampler, resized_sampler
from .smoothness import SmoothnessEstimator, measured
from .trace import FirstForwardTrace
from .truncation import compiled

PENDING_LAYER = "(every parameter: the layers are found at the first forward)"
PENDING_ORDER = "pending (the layers are found at the first forward)"
REGISTRATION_ORDER = "registration (first forward not yet seen)"


@dataclass(frozen=True)
class SamplerOptions:
    """The constructor's sampling options, kept to build the sampler again whenever the number
    of layers changes (``sampling`` may be a name, a list of probabilities or a sampler
    object; see :func:`.sampling.make_sampler`)."""

    sampling: object
    seed: int = 0
    tau: int | None = None
    total_steps: int | None = None
    shift_strength: float | None = None

    @property
    def custom(self) -> bool:
        probabilities = isinstance(self.sampling, (list, tuple, Tensor))
        return probabilities or (isinstance(self.sampling, str) and self.sampling == "custom")

    def build(self, num_layers: int, pending: bool):
        """The sampler over ``num_layers`` layers (while they are pending, one: a tau_nice tau
        is checked against the real count when they are found)."""
        tau = self.tau
        if pending and isinstance(tau, int):
            tau = min(tau, num_layers)
        return make_sampler(
            self.sampling, num_layers, seed=self.seed, tau=tau, total_steps=self.total_steps,
            shift_strength=self.shift_strength,
        )  # fmt: skip


class LayerBook:
    """The layers of one optimizer over ``groups`` (its param groups, the same list)."""

    def __init__(
        self,
        groups: list[dict],
        model: nn.Module | None,
        *,
        role_norms: dict[str, str],
        fallback: str,
        sampler_options: SamplerOptions,
        smoothness_beta: float,
        smoothness_every: int,
        cuda_kernels: bool | None,
        diagnostics: Diagnostics,
        layering: str = "modules",
    ) -> None:
        self.groups = groups
        self.layering = layering  # what a layer of a model is (partition.model_layers)
        self.role_norms, self.fallback = role_norms, fallback
        self.sampler_options = sampler_options
        self.cuda_kernels = cuda_kernels
        self.diagnostics = diagnostics
        self.names = param_names(groups)
        # Parameters or groups without "layer" keys: the layers are the modules that own them
        # in the model the first forward runs (found then); until then one provisional layer.
        self.pending = model is None and "layer" not in groups[0]
        self.by_use = False  # the layers were found by the first forward (a model run)
        if self.pending and sampler_options.custom:
            raise ValueError(
                "custom cutoff probabilities need the layers at construction, but these "
                "parameters' layers are found at the first forward (by the modules that "
                "own them): pass the model itself, or param groups with 'layer' keys"
            )
        if model is not None:
            managed = {id(p) for p in self.params()}
            layers = model_layers(model, managed, layering)
        elif self.pending:
            layers = self._pending_layers()
        else:
            layers = group_layers(groups, self.names)
        self.partition = Partition.of(layers)
        self.model = model
        self.update_counts = [0] * self.num_layers
        self.skipped_nonfinite = [0] * self.num_layers
        self.smoothness = SmoothnessEstimator(
            self.num_layers, smoothness_beta, cuda_kernels, smoothness_every
        )
        self.sampler = sampler_options.build(self.num_layers, self.pending)
        self.norms = self.assign_norms()
        for p in self.params():
            check_param(p, self.name(p), self.norm(p))
        # With a module, the first forward orders the layers (registration may differ).
        self.trace = FirstForwardTrace(layers, model) if model is not None else None
        self.order = REGISTRATION_ORDER if model is not None else "param groups"
        if self.pending:
            self.order = PENDING_ORDER
        self.mask = self.draw(0)

    # -- reading ----------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.partition.layers)

    @property
    def cutoff(self) -> int:
        return self.mask.index(True)

    def params(self):
        """Every managed parameter, in param-group order."""
        return (p for group in self.groups for p in group["params"])

    def params_and_norms(self):
        return ((p, self.norms[id(p)]) for p in self.params())

    def name(self, p: Tensor) -> str:
        return self.names[id(p)]

    def norm(self, p: Tensor) -> str:
        return self.norms[id(p)]

    def position(self, p: Tensor) -> int:
        return self.partition.layer_of[id(p)].position

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.partition.by_position()]

    def is_active(self, p: Tensor) -> bool:
        layer = self.partition.layer_of[id(p)]
        if self.trace is not None:  # step 0: positions as the first forward reaches layers
            position = self.trace.positions.get(layer.construction_index)
            return True if position is None else self.mask[position]
        return self.mask[layer.position]

    def updates_every_layer(self) -> bool:
        """Muon: every layer every step, its layers final (nothing for the hooks to do)."""
        return getattr(self.sampler, "kind", None) == "full" and not self.pending

    def inactive_params(self) -> list[Tensor]:
        return [
            p for layer in self.partition.layers if not self.mask[layer.position]
            for _, p in layer.params
        ]  # fmt: skip

    def cutoff_layer(self) -> Layer:
        return self.partition.by_position()[self.cutoff]

    def user_frozen(self) -> set[int]:
        """Positions of the layers none of whose parameters require grad (the user's freeze)."""
        return {
            layer.position
            for layer in self.partition.layers
            if not any(p.requires_grad for _, p in layer.params)
        }

    def assign_norms(self) -> dict[int, str]:
        return assign_norms(self.groups, self.partition, self.role_norms, self.fallback)

    def possible_norms(self, group: dict, p: Tensor) -> set[str]:
        """Every norm ``p`` could get in ``group`` (its layer's place is not known yet)."""
        if group["norm"] != "auto":
            return {group["norm"]}
        if p.dim() < 2:
            return {resolve_norm("vector", self.role_norms, self.fallback)}
        return {resolve_norm(role, self.role_norms, self.fallback) for role in ROLES[:3]}

    # -- the draw ---------------------------------------------------------------------------------

    def draw(self, step: int) -> list[bool]:
        """The layers step ``step`` updates (the coming step's ``mask``)."""
        if self.pending:  # one provisional layer: the real draw comes with the layers
            return [True] * self.num_layers
        return draw(self.sampler, step, self.num_layers, self.sampling_estimates())

    def distribution(self, step: int) -> list[float] | None:
        """P(cutoff) of step ``step``'s draw (None for a user's sampler object)."""
        if not isinstance(self.sampler, LayerSampler):
            return None
        return self.sampler.distribution(step, self.sampling_estimates()).tolist()

    def sampling_estimates(self) -> list[float] | None:
        """The smoothness estimates cost_optimal draws from (``SmoothnessEstimator.
        for_sampling``), told which layers hold a trainable matrix (what the estimates measure:
        a layer the user froze never gets one, and must not hold the draw back)."""
        has_matrices = [False] * self.num_layers
        for layer in self.partition.layers:
            has_matrices[layer.position] = any(
                measured(p) and p.requires_grad for _, p in layer.params
            )
        return self.smoothness.for_sampling(has_matrices)

    def embedding_ids(self) -> set[int]:
        """The ids of the embedding tables (the smoothness estimates measure them as lookups)."""
        return {
            id(p) for layer in self.partition.layers for _, p in layer.params
            if param_role(layer, p, is_last_layer=False) == "embedding"
        }  # fmt: skip

    def active_gradients(self) -> tuple[dict[int, list], dict]:
        """The active parameters with gradients, by layer position, as (group, norm, param),
        checked; and each of their groups' Newton-Schulz schedule by ``id(group)``. As in
        torch.optim, a parameter without a gradient is left alone (whatever its
        requires_grad)."""
        by_layer: dict[int, list] = defaultdict(list)
        schedules = {}
        for group in self.groups:
            for p in group["params"]:
                position = self.partition.layer_of[id(p)].position
                if p.grad is None or not self.mask[position]:
                    continue
                if id(group) not in schedules:  # a scheduler or the user may have changed it
                    schedules[id(group)] = check_group(group)
                check_grad(p, self.names[id(p)])
                by_layer[position].append((group, self.norms[id(p)], p))
        return by_layer, schedules

    # -- finding the layers -----------------------------------------------------------------------

    def _pending_layers(self) -> list[Layer]:
        return [Layer(0, PENDING_LAYER, [(self.name(p), p) for p in self.params()])]

    def use_layers(self, layers: list[Layer], model: nn.Module | None, step: int) -> list[Tensor]:
        """Pending layers become ``layers``: the sampler, the statistics, the norms and
        ``step``'s draw follow (nothing was updated under the provisional ones that a different
        norm would need to keep). Returns the parameters whose state starts again."""
        self.pending = False
        self.partition = Partition.of(layers)
        self.model = model
        self.update_counts = [0] * self.num_layers
        self.skipped_nonfinite = [0] * self.num_layers
        self.smoothness = SmoothnessEstimator(
            self.num_layers, self.smoothness.beta, self.cuda_kernels, self.smoothness.every
        )
        self.sampler = self.sampler_options.build(self.num_layers, pending=False)
        before, self.norms = self.norms, self.assign_norms()
        for p in self.params():
            check_param(p, self.name(p), self.norm(p))
        self.mask = self.draw(step)
        return [p for p in self.params() if (before[id(p)] == "adamw") != (self.norm(p) == "adamw")]

    def find_layers(self, root: nn.Module, step: int) -> list[Tensor] | None:
        """At the first forward of pending layers: the layers become the modules that own the
        parameters in ``root``, the model being run (DDP's and torch.compile's wrappers
        unwrapped), placed by the forward as for a model passed itself; a parameter no module
        owns is a layer of its own. None when ``root`` holds none of them (a loss module: the
        model comes later); else as :meth:`use_layers`."""
        model = unwrapped(root)
        managed = {id(p) for p in self.params()}
        if not any(id(p) in managed for p in model.parameters()):
            return None
        owned_layers = model_layers(model, managed, self.layering)
        owned = {id(p) for layer in owned_layers for _, p in layer.params}
        names = {id(p): n for layer in owned_layers for n, p in layer.params}
        given = param_names(self.groups)
        loose = [p for p in self.params() if id(p) not in owned]
        layers = owned_layers + [
            Layer(len(owned_layers) + i, given[id(p)], [(given[id(p)], p)])
            for i, p in enumerate(loose)
        ]
        user_named = {id(p) for g in self.groups if "param_names" in g for p in g["params"]}
        self.names = {k: given[k] if k in user_named else n for k, n in names.items()}
        self.names.update({id(p): given[id(p)] for p in loose})
        Partition.of(layers).rename(self.names)
        restart = self.use_layers(layers, model, step)
        self.by_use = True
        self.trace = FirstForwardTrace(self.partition.layers, model)
        self.order = REGISTRATION_ORDER
        return restart

    def layers_without_forward(self, step: int) -> list[Tensor]:
        """A step came before any module call found the layers (gradients set by hand, or a
        forward outside any nn.Module): one layer per parameter, in the order given."""
        params = list(self.params())
        layers = [Layer(i, self.name(p), [(self.name(p), p)]) for i, p in enumerate(params)]
        restart = self.use_layers(layers, None, step)
        self.order = "param groups"
        if len(params) > 1 and getattr(self.sampler, "kind", None) != "full":  # order matters
            warn_order_unknown(len(params))
        return restart

    def use_saved_layers(self, layers: list[Layer], order: str, step: int) -> list[Tensor]:
        """Loading into pending layers: the layers a checkpoint saved (see
        :func:`dropmuon.checkpoint.saved_layers`); as :meth:`use_layers`."""
        restart = self.use_layers(layers, None, step)
        self.order = order
        return restart

    def finish_trace(self) -> bool:
        """Adopts the traced order (once per trace), keeping each layer's statistics, and warns
        of the layers the forward never used. Returns whether there was a trace to finish."""
        if self.trace is None:
            return False
        self._check_params_still_registered()
        before = [layer.position for layer in self.partition.layers]
        self.mask = self.trace.finish(self.mask)
        if self.trace.unused:
            warn_unused_layers(self.trace.unused)
            # They come first; the warning above already says they get no gradient.
            self.diagnostics.warned_layers.update(range(len(self.trace.unused)))
        self.trace = None
        self.order = "first forward"
        self._reorder_statistics(before)
        self.norms = self.assign_norms()  # the head is the last layer
        return True

    def _check_params_still_registered(self) -> None:
        """Raises (before the first step changes anything) when the model no longer holds the
        parameters the optimizer was built on: fully_shard, for one, registers new ones."""
        for layer in self.partition.layers:
            if layer.module is None:
                continue
            registered = {id(q) for q in layer.module.parameters()}
            for name, p in layer.params:
                if id(p) not in registered:
                    raise RuntimeError(
                        f"DropMuon: the model's parameter '{name}' is not the tensor this "
                        "optimizer was built on (fully_shard, or another wrapper, replaced "
                        "it): build the optimizer after fully_shard"
                    )

    # -- new parameters ---------------------------------------------------------------------------

    def new_group(self, param_group, index: int) -> dict:
        """A group for :meth:`dropmuon.DropMuon.add_param_group`, checked before torch adds
        it (``index``: its place among the groups); a module-built optimizer's groups carry the
        model's names for their parameters (one that is not the model's is refused)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        if isinstance(self.sampler, LayerSampler) and self.sampler.kind == "custom":
            raise ValueError(
                "sampling='custom' has one probability per layer, fixed at construction: build "
                "a new optimizer (or pass a sampler object) to add parameters"
            )
        if ("layer" in param_group) != ("layer" in self.groups[0]):
            raise ValueError("either every param group has a 'layer' index or none does")
        check_layer_keys([param_group])
        check_group_keys(param_group, index)
        if self.model is None or self.by_use:
            return param_group
        names = {id(p): n for n, p in self.model.named_parameters()}
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

    def check_added_group(self, group: dict, count: int) -> dict[int, str]:
        """Checks the group torch has just added as the last of ``count``, with every norm its
        parameters could get (their layers' places are not known yet); returns the names."""
        check_group(group)
        check_group_norm(group)
        check_no_duplicates(group, count - 1)
        names = param_names(self.groups)
        for p in group["params"]:
            for norm in self.possible_norms(group, p):
                check_param(p, names[id(p)], norm)
        return names

    def add_group(self, group: dict, names: dict[int, str], step: int) -> None:
        """The groups' new last group ``group`` joins the layers (see
        :meth:`dropmuon.DropMuon.add_param_group`); the statistics, the sampler, the norms and
        ``step``'s draw follow."""
        self.names = names
        if self.pending:  # the new parameters wait with the others for the first forward
            self.partition = Partition.of(self._pending_layers())
            self.norms = self.assign_norms()
            return
        before = [layer.position for layer in self.partition.layers]
        self.partition, new_layers = self.partition.extended(
            group, names, self.model, self.layering
        )
        before += range(len(before), self.num_layers)  # new layers: appended, then moved
        if self.model is not None:
            # The new modules' places are unknown: the next forward orders every layer again.
            self.trace = FirstForwardTrace(self.partition.layers, self.model)
            self.order = REGISTRATION_ORDER
        self.update_counts += [0] * len(new_layers)
        self.skipped_nonfinite += [0] * len(new_layers)
        self.smoothness.add_layers(len(new_layers))
        self._reorder_statistics(before)
        self.sampler = resized_sampler(self.sampler, self.num_layers)
        self.norms = self.assign_norms()
        self.mask = self.draw(step)

    def _reorder_statistics(self, before: list[int]) -> None:
        """The per-position lists after the layers moved from positions ``before``."""
        moves = [(old, layer.position) for old, layer in zip(before, self.partition.layers)]

        def moved(values):
            out = list(values)
            for old, new in moves:
                out[new] = values[old]
            return out

        self.update_counts = moved(self.update_counts)
        self.skipped_nonfinite = moved(self.skipped_nonfinite)
        self.smoothness.smoothness = moved(self.smoothness.smoothness)
        self.smoothness.last_step_norm = moved(self.smoothness.last_step_norm)

    # -- checkpoints ------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """What :meth:`use_layers` changes, to undo it when a checkpoint is refused."""
        return dict(self.__dict__)

    def restore(self, snapshot: dict) -> None:
        self.__dict__.update(snapshot)

    def norms_at(self, positions: dict) -> dict[int, str]:
        """The norms the parameters would get with the layers at ``positions``."""
        current = {layer: layer.position for layer in self.partition.layers}
        try:
            for layer, position in positions.items():
                layer.position = position
            return self.assign_norms()
        finally:
            for layer, position in current.items():
                layer.position = position

    def load(self, checked) -> None:
        """A validated checkpoint's layers and statistics (``checked``: a
        :class:`dropmuon.checkpoint.Checked`): its positions (equal to ours once
        ours are final) place the statistics, and a checkpoint whose order is final ends the
        trace."""
        if self.model is None:  # torch adopted the checkpoint's param_names
            self.names = param_names(self.groups)
            self.partition.rename(self.names)
        for layer, position in checked.positions.items():
            layer.position = position
        if checked.adopt_order:
            self.trace = None
            self.order = "checkpoint"
        self.norms = self.assign_norms()
        self.sampler = checked.sampler
        self.update_counts = list(checked.section["update_counts"])
        self.skipped_nonfinite = list(checked.section["skipped_nonfinite"])
        self.smoothness.smoothness = list(checked.smoothness)
        self.smoothness.last_step_norm = list(checked.last_step_norm)

    # -- copies -----------------------------------------------------------------------------------

    def __getstate__(self):
        """The modules are kept only while the first forward is still to be traced (it needs
        them); after that a copy holds the layers without their modules, so pickling the
        optimizer does not pickle the model. Maps keyed by ``id()`` are rebuilt on loading."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("names", "norms")}
        keep_modules = self.trace is not None
        state["partition"] = [
            Layer(
                layer.construction_index, layer.name, list(layer.params),
                layer.module if keep_modules else None, layer.position, layer.key,
                list(layer.embeddings),
            )
            for layer in self.partition.layers
        ]  # fmt: skip
        if not keep_modules:
            state["model"] = None
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self.partition = Partition.of(state["partition"])
        self.names = {id(p): name for layer in self.partition.layers for name, p in layer.params}
        self.norms = self.assign_norms()
        if self.trace is not None:
            self.trace = FirstForwardTrace(self.partition.layers, self.model, self.trace.positions)


def unwrapped(module: nn.Module) -> nn.Module:
    """The model inside DDP's and torch.compile's wrappers."""
    for _ in range(8):
        if compiled(module):
            module = module._orig_mod
        elif isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        else:
            break
    return module
