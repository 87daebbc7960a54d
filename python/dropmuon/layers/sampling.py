"""Which layers each Drop-Muon step updates (docs/method.md section 2).

:class:`LayerSampler` wraps the C sampler (``dropmuon.ops.sample_layers``): every draw is a pure
function of ``(seed, step)`` and the configuration, so a resumed run and every data-parallel rank
draw the same layers without saving generator state or communicating.

A user-defined sampler is any object with ``sample(step, num_layers) -> sequence of bool`` (the
active mask; at least one True); it may also define ``distribution(num_layers)`` (P(cutoff = i))
and ``state_dict()`` / ``load_state_dict(d)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..defaults import DEFAULT_SAMPLING, DEFAULT_SHIFT_STRENGTH, PROBABILITY_TOLERANCE, SAMPLINGS
from ..kernels import ops


class LayerSampler:
    """The built-in distributions over the cutoff (layers are 0-based, input first).

    Args:
        kind: ``"full"`` (always cutoff 0: Muon), ``"uniform"``, ``"custom"`` (needs
            ``probabilities``), ``"tau_nice"`` (needs ``tau``: that many distinct layers, the
            cutoff is the lowest), ``"epoch_shift"`` (mass moves from shallow to deep cutoffs as
            training progresses; see :meth:`distribution`), ``"cost_optimal"`` (from per-layer
            smoothness estimates, docs/method.md section 3).
        num_layers: how many layers the model is split into.
        seed: the key of the counter-based generator.
        probabilities: ``custom``: P(cutoff = i), finite, >= 0, summing to 1 within 1e-6
            (never renormalised).
        tau: ``tau_nice``: 1 <= tau <= num_layers.
        total_steps: ``epoch_shift``: progress = step / total_steps. Without it the progress is
            whatever :meth:`set_progress` last set (0 at first).
        shift_strength: ``epoch_shift``: P(cutoff = i) is proportional to
            ``exp(shift_strength * (2 * progress - 1) * i / (num_layers - 1))``: nearly full
            updates at progress 0, uniform at 0.5, mostly the top layers at 1.
    """

    def __init__(
        self,
        kind: str = DEFAULT_SAMPLING,
        num_layers: int = 1,
        *,
        seed: int = 0,
        probabilities: Sequence[float] | None = None,
        tau: int | None = None,
        total_steps: int | None = None,
        shift_strength: float = DEFAULT_SHIFT_STRENGTH,
    ) -> None:
        if kind not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}; got {kind!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        self.kind = kind
        self.num_layers = num_layers
        self.seed = seed
        self.probabilities = None
        self.tau = None
        self.total_steps = None
        self.shift_strength = float(shift_strength)
        self.progress_value = 0.0
        if kind == "custom":
            self.probabilities = _check_probabilities(probabilities, num_layers)
        elif probabilities is not None:
            raise ValueError(f"probabilities only apply to sampling='custom', not {kind!r}")
        if kind == "tau_nice":
            if not isinstance(tau, int) or not 1 <= tau <= num_layers:
                raise ValueError(f"tau_nice needs an int tau in [1, {num_layers}], got {tau!r}")
            self.tau = tau
        elif tau is not None:
            raise ValueError(f"tau only applies to sampling='tau_nice', not {kind!r}")
        if total_steps is not None:
            if not isinstance(total_steps, int) or total_steps < 1:
                raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
            self.total_steps = total_steps
        if not math.isfinite(self.shift_strength) or self.shift_strength < 0:
            raise ValueError(f"shift_strength must be finite and >= 0, got {shift_strength!r}")

    # -- progress (epoch_shift) ------------------------------------------------------------------

    def set_progress(self, progress: float) -> None:
        """Sets the fraction of training done, in [0, 1] (used when total_steps is None)."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress!r}")
        self.progress_value = float(progress)

    def progress(self, step: int) -> float:
        if self.total_steps is not None:
            return min(1.0, step / self.total_steps)
        return self.progress_value

    # -- draws ---------------------------------------------------------------------------------

    def _options(self, step: int, smoothness: Sequence[float] | None) -> dict:
        if self.kind == "cost_optimal" and smoothness is None:
            smoothness = [1.0] * self.num_layers  # no estimates yet: full updates
        return dict(
            probabilities=self.probabilities,
            tau=self.tau,
            progress=self.progress(step),
            shift_strength=self.shift_strength,
            smoothness=smoothness if self.kind == "cost_optimal" else None,
        )

    def distribution(self, step: int = 0, smoothness: Sequence[float] | None = None) -> Tensor:
        """P(cutoff = i) for each layer at ``step`` (float64)."""
        options = self._options(step, smoothness)
        return ops.sampler_distribution(self.num_layers, self.kind, **options)

    def sample(self, step: int, smoothness: Sequence[float] | None = None) -> list[bool]:
        """The active mask of optimizer step ``step``."""
        options = self._options(step, smoothness)
        mask = ops.sample_layers(self.num_layers, self.seed, step, self.kind, **options)
        return mask.tolist()

    # -- checkpoints -----------------------------------------------------------------------------

    # The constructor's arguments, and the progress set by set_progress: all a checkpoint needs.
    _CONFIG = ("seed", "probabilities", "tau", "total_steps", "shift_strength")

    def state_dict(self) -> dict:
        state = {key: getattr(self, key) for key in ("kind", "num_layers", *self._CONFIG)}
        state["progress"] = self.progress_value
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in ("kind", "num_layers"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"checkpoint sampler has {key}={state.get(key)!r}, this optimizer "
                    f"{getattr(self, key)!r}"
                )
        # Built anew from the saved values, so they pass the constructor's checks.
        restored = LayerSampler(
            state["kind"], state["num_layers"], **{key: state[key] for key in self._CONFIG}
        )
        restored.set_progress(state["progress"])
        self.__dict__.update(restored.__dict__)

    def __repr__(self) -> str:
        extra = {"custom": "probabilities", "tau_nice": "tau", "epoch_shift": "total_steps"}
        detail = (
            f", {extra[self.kind]}={getattr(self, extra[self.kind])}" if self.kind in extra else ""
        )
        return (
            f"LayerSampler({self.kind!r}, num_layers={self.num_layers}, seed={self.seed}{detail})"
        )


def _check_probabilities(probabilities, num_layers: int) -> list[float]:
    if probabilities is None:
        raise ValueError("sampling='custom' needs probabilities (one per layer)")
    values = [float(v) for v in probabilities]
    if len(values) != num_layers:
        raise ValueError(
            f"custom sampling needs one probability per layer: got {len(values)} for "
            f"{num_layers} layers"
        )
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"probabilities must be finite and >= 0, got {values}")
    if abs(sum(values) - 1.0) > PROBABILITY_TOLERANCE:
        raise ValueError(
            f"probabilities must sum to 1 (within {PROBABILITY_TOLERANCE}), got {sum(values)!r}; "
            "they are never renormalised"
        )
    return values


def mask_from_user_sampler(sampler, step: int, num_layers: int) -> list[bool]:
    """Calls a user sampler and checks what it returns."""
    mask = sampler.sample(step, num_layers)
    if isinstance(mask, torch.Tensor):
        mask = mask.tolist()
    mask = [bool(v) for v in mask]
    if len(mask) != num_layers or not any(mask):
        raise ValueError(
            f"{type(sampler).__name__}.sample() must return {num_layers} booleans with at least "
            f"one True, got {mask}"
        )
    return mask


def make_sampler(sampling, num_layers: int, *, seed, tau, total_steps, shift_strength):
    """DropMuon's ``sampling`` argument as a sampler: a name (:class:`LayerSampler`), a list of
    cutoff probabilities (``"custom"``), or a user object with ``sample(step, num_layers)``."""
    if isinstance(sampling, str):
        return LayerSampler(
            sampling,
            num_layers,
            seed=seed,
            tau=tau,
            total_steps=total_steps,
            shift_strength=shift_strength,
        )
    if isinstance(sampling, (list, tuple, Tensor)):
        probabilities = sampling.tolist() if isinstance(sampling, Tensor) else sampling
        return LayerSampler("custom", num_layers, seed=seed, probabilities=probabilities)
    if callable(getattr(sampling, "sample", None)):
        return sampling
    raise ValueError(
        "sampling must be a name, a list of cutoff probabilities, or an object with "
        f"sample(step, num_layers); got {sampling!r}"
    )


def resized_sampler(sampler, num_layers: int):
    """The sampler for a model that now has ``num_layers`` layers: a built-in one rebuilt with
    the same configuration and progress (``"custom"`` cannot be: its probabilities are per
    layer); a user sampler as it is (it gets the number of layers at every draw)."""
    if not isinstance(sampler, LayerSampler) or sampler.num_layers == num_layers:
        return sampler
    if sampler.kind == "custom":
        raise ValueError("sampling='custom' has one probability per layer: it cannot follow")
    state = sampler.state_dict()
    resized = LayerSampler(
        sampler.kind, num_layers, **{key: state[key] for key in LayerSampler._CONFIG}
    )
    resized.set_progress(state["progress"])
    return resized


def draw(sampler, step: int, num_layers: int, smoothness: Sequence[float] | None) -> list[bool]:
    """The active mask of step ``step``; ``cost_optimal`` draws from ``smoothness`` (None
    until the estimates are ready: full updates)."""
    if isinstance(sampler, LayerSampler):
        return sampler.sample(step, smoothness if sampler.kind == "cost_optimal" else None)
    return mask_from_user_sampler(sampler, step, num_layers)
