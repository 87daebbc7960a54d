"""``describe(optimizer)``: the layer partition as a table, from the optimizer's public API."""

from __future__ import annotations

from collections import defaultdict

from .update_rules import matrix_shape


def describe(optimizer) -> str:
    """A table of a DropMuon optimizer's layers: position, name, whether the next step updates
    it, update count, P(cutoff) of the next draw, the smoothness estimate (``-``: none), and
    each parameter's shape and norm (with the matrix a spectral update sees)."""
    lines = [
        f"{type(optimizer).__name__}: {optimizer.num_layers} layers, ordered by "
        f"{optimizer.layer_order}; sampling {optimizer.sampler!r}; step {optimizer.step_count}",
        f"{'layer':>5}  {'name':<24} {'next':<6} {'updates':>7}  {'P(cut)':>6}  {'L':>8}  "
        "parameters",
    ]
    probabilities = optimizer.cutoff_probabilities
    rows = defaultdict(list)
    for group in optimizer.param_groups:
        for p in group["params"]:
            norm = optimizer.norm_of(p)
            view = ""
            if norm == "spectral":
                view = " as {}x{}".format(*matrix_shape(p.shape))
            rows[optimizer.layer_of(p)].append(
                f"{optimizer.param_name(p)} {tuple(p.shape)} {norm}{view}"
            )
    names = optimizer.layer_names()
    for layer in range(optimizer.num_layers):
        chance = f"{probabilities[layer]:.3f}" if probabilities else "-"
        estimate = optimizer.smoothness[layer]
        estimate = "-" if estimate is None else f"{estimate:.3g}"
        active = "active" if optimizer.active_layers[layer] else "frozen"
        params = "; ".join(rows[layer]) or "(none)"
        lines.append(
            f"{layer:>5}  {names[layer]:<24} {active:<6} {optimizer.update_counts[layer]:>7}  "
            f"{chance:>6}  {estimate:>8}  {params}"
        )
    return "\n".join(lines)
