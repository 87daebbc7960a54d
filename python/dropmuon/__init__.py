"""dropmuon: Drop-Muon and Muon optimizers with randomized backprop truncation.

Drop-Muon (Gruntkowska et al., arXiv 2510.02239) updates, each step, only the layers from a
randomly sampled cutoff up to the output, with Muon-style per-layer non-Euclidean updates, and
stops backpropagation at that cutoff.
"""

import sys

import torch  # noqa: F401  (loads libtorch before the extension)

from .defaults import MUON_COEFFICIENTS, POLAR_EXPRESS_COEFFICIENTS
from .describe import describe
from .diagnostics import (
    DropMuonWarning,
    LayerOrderWarning,
    NoGradientWarning,
    TruncationDefeatedWarning,
)
from .distributed import fsdp
from .kernels import ops, reference
from .kernels.ops import sample_layers, sampler_distribution, sharp
from .layers.sampling import LayerSampler
from .optimizer import DropMuon, Muon
from .update_rules import NewtonSchulzSchedule, ns_schedule

__version__ = "0.1.0"

# The module paths of dropmuon 0.1 (``import dropmuon.ops``, ``from dropmuon.fsdp import ...``)
# name the same modules in their subpackages.
for _module in (ops, reference, fsdp):
    sys.modules[f"{__name__}.{_module.__name__.rpartition('.')[2]}"] = _module
del _module

__all__ = [
    "DropMuon",
    "DropMuonWarning",
    "LayerOrderWarning",
    "NoGradientWarning",
    "TruncationDefeatedWarning",
    "LayerSampler",
    "Muon",
    "describe",
    "MUON_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS",
    "NewtonSchulzSchedule",
    "ns_schedule",
    "ops",
    "reference",
    "sample_layers",
    "sampler_distribution",
    "sharp",
]
