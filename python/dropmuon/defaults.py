"""The one place for the names every option accepts and for their defaults.

The optimizer, the sampler, the references and the comparison harness all read these; the shim
parses the same names (csrc/include/dropmuon/aten/arguments.h) into the enums of dropmuon.h.
"""

from __future__ import annotations

# -- The sharp operators (docs/method.md section 4) --------------------------------------------

# The norms the kernels implement; "adamw" is the optimizer's extra choice (no kernel: an AdamW
# step in Python, see dropmuon.step.adamw).
KERNEL_NORMS = ("spectral", "sign", "column", "row", "frobenius")
NORMS = (*KERNEL_NORMS, "adamw")
# What a parameter is, for choosing its default norm (dropmuon.layers.partition.param_role).
ROLES = ("matrix", "head", "embedding", "vector")
DEFAULT_ROLE_NORMS = {"matrix": "spectral", "head": "spectral", "embedding": "spectral"}
# The norm of vectors (0-D and 1-D parameters) unless `norms` says otherwise.
FALLBACKS = ("sign", "adamw")
# What a layer is, for a model: each module holding parameters, or depth units (blocks).
LAYERINGS = ("modules", "blocks")
# AdamW: what "Muon for matrices" users put the rest on; sign updates (0.1's default) move every
# bias and norm gain by the full lr at every step, and a word-level language model then barely
# learns (benchmarks/RESULTS.md, "Defaults").
DEFAULT_FALLBACK = "adamw"

LR_ADJUSTS = ("none", "original", "match_rms_adamw")  # the kernels' names; "none": lr as is
ADJUST_LR_FNS = ("original", "match_rms_adamw")  # what torch.optim.Muon's adjust_lr_fn accepts
RADII = ("fixed", "adaptive")
NS_PRECISIONS = ("native", "bfloat16")

# -- Newton-Schulz schedules --------------------------------------------------------------------

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS_COEFFICIENTS = (
    (8.1566, -22.4833, 15.8788),
    (4.0429, -2.8089, 0.5000),
    (3.8917, -2.7725, 0.5061),
    (3.2858, -2.3681, 0.4645),
    (2.3465, -1.7098, 0.4232),
)
# Polar Express divides by ||M||_F * 1.02 + 1e-6 (docs/method.md section 4); Muon by ||M||_F.
POLAR_EXPRESS_NORM = (1.02, 1e-6)

# -- Sampling (docs/method.md section 2) --------------------------------------------------------

SAMPLINGS = ("full", "uniform", "custom", "tau_nice", "epoch_shift", "cost_optimal")
DEFAULT_SAMPLING = "uniform"  # the paper's experiments
PROBABILITY_TOLERANCE = 1e-6  # the C sampler's tolerance on sum(p) == 1
DEFAULT_SHIFT_STRENGTH = 4.0  # epoch_shift's tilt

# -- The optimizer ------------------------------------------------------------------------------

NONFINITE_MODES = ("raise", "skip")
DEFAULT_SMOOTHNESS_BETA = 0.9
# A layer's smoothness estimate is refreshed on every k-th of its active steps: the
# distribution it induces stays within its own drift between evaluations at k = 10.
DEFAULT_SMOOTHNESS_EVERY = 10  # 1-2% of a training step instead of 6-13% (RESULTS section 8)
# Power iterations for the spectral norm of a step in the smoothness estimator.
SMOOTHNESS_POWER_ITERATIONS = 20

# The per-group options and their defaults: DropMuon.__init__ starts from these, and
# __setstate__ fills in the ones an older pickled optimizer lacks. lr, weight_decay, momentum,
# nesterov, ns_coefficients, ns_steps, eps and adjust_lr_fn are torch.optim.Muon's.
GROUP_DEFAULTS = dict(
    lr=1e-3,
    weight_decay=0.1,
    momentum=0.95,
    nesterov=True,
    ns_coefficients="muon",
    ns_steps=5,
    eps=1e-7,
    adjust_lr_fn=None,
    ns_precision="bfloat16",
    radius="fixed",
    L0=1.0,
    L1=0.0,
    norm="auto",  # "auto": each parameter's norm from its role; or one of NORMS
    adamw_lr_ratio=1.0,  # AdamW's lr as a ratio to the group's lr (schedulers scale both)
    betas=(0.9, 0.999),  # AdamW's
    adamw_eps=1e-8,
)
