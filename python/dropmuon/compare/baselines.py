"""The Muon implementations people already run, as named baselines of the harness.

Each is an optional package (``pip install "dropmuon[baselines]"`` installs the pinned versions
below, none of which replaces torch), configured as its own README recommends for a CNN or a
transformer: its Muon for the hidden matrices (every parameter of two or more dimensions outside
the embeddings and the output layer; conv kernels whole, each package flattens them itself) and
its own AdamW for the rest (embeddings, the output layer, biases and gains), with the harness's
momentum, weight decay (both parts) and AdamW lr, so that ``--lr-grid`` tunes the Muon lr of
every Muon-family optimizer the same way.

- ``kj-muon``: Keller Jordan's reference Muon (``muon.SingleDeviceMuonWithAuxAdam``, package
  ``muon-optimizer``), the implementation modded-nanogpt and most papers start from: bfloat16
  Newton-Schulz (3.4445, -4.7750, 2.0315), Nesterov, lr scaled by ``sqrt(max(1, rows/cols))``,
  AdamW betas (0.9, 0.95), eps 1e-10. Its 0.1.0 release flattens a conv kernel's update but
  adds it to the 4-D kernel unshaped (a RuntimeError), so conv kernels are given to it as 2-D
  (out, in*kh*kw) parameters, as its README says to view them (the harness's
  ``flatten_conv_kernels``, which ``torch-muon`` uses too). Its distributed variant fills zeros
  for ``p.grad is None`` (a "frozen" layer still decays); the single-device one used here needs
  a gradient for every parameter (the harness freezes nothing for it).
- ``po-muon``, ``po-adamuon``, ``po-normuon``: ``pytorch_optimizer``'s Muon, AdaMuon (Adam-style
  second moment on the orthogonalized update) and NorMuon (neuron-wise normalised Muon), each
  with its defaults (``use_adjusted_lr`` as the package sets it).

Our own Muon follows Keller Jordan's trajectory with the options of
``tests/python/test_baselines.py``'s parity test.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize


@dataclass(frozen=True)
class Baseline:
    """A baseline: its ``--optimizers`` name, the package to install (pinned in setup.py's
    ``baselines`` extra) and the module it imports, and how to build it."""

    name: str
    package: str
    module: str
    summary: str
    build: Callable  # (module, hidden matrices, the rest, lr, args) -> optimizer
    takes_matrices: bool = False  # conv kernels go to it as 2-D parameters


class FlattenedKernel(nn.Module):
    """Parametrization holding a conv kernel as a 2-D (out, in*kh*kw) parameter."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, matrix):
        return matrix.reshape(self.shape)

    def right_inverse(self, kernel):
        return kernel.reshape(kernel.shape[0], -1)


def flatten_conv_kernels(model: nn.Module) -> None:
    """Re-registers every conv kernel of ``model`` as a 2-D (out, in*kh*kw) parameter (reshaped
    back to 4-D in forward), for Muon implementations that take matrices only."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            parametrize.register_parametrization(
                module, "weight", FlattenedKernel(module.weight.shape)
            )


def hidden_matrices(model: nn.Module) -> tuple[list, list]:
    """(Muon's parameters, AdamW's): the hidden matrices, and the embeddings' and the output
    layer's parameters (the last module that holds parameters) with every vector."""
    holders = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    aside = {id(p) for p in holders[-1].parameters(recurse=False)} if holders else set()
    for module in holders:
        if "Embedding" in type(module).__name__:
            aside |= {id(p) for p in module.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    muon = [p for p in trainable if p.dim() >= 2 and id(p) not in aside]
    return muon, [p for p in trainable if id(p) not in {id(q) for q in muon}]


def _groups(muon: list, rest: list, muon_options: dict, adamw_options: dict) -> list[dict]:
    groups = [dict(params=muon, use_muon=True, **muon_options)] if muon else []
    return groups + ([dict(params=rest, use_muon=False, **adamw_options)] if rest else [])


def _keller_jordan(module, muon, rest, lr, args):
    return module.SingleDeviceMuonWithAuxAdam(
        _groups(
            muon,
            rest,
            dict(lr=lr, momentum=args.momentum, weight_decay=args.weight_decay),
            dict(lr=args.adamw_lr, betas=(0.9, 0.95), eps=1e-10, weight_decay=args.weight_decay),
        )
    )


def _pytorch_optimizer(class_name: str, **options):
    def build(module, muon, rest, lr, args):
        return getattr(module, class_name)(
            _groups(muon, rest, {}, {}),
            lr=lr,
            weight_decay=args.weight_decay,
            adamw_lr=args.adamw_lr,
            adamw_wd=args.weight_decay,
            **{key: getattr(args, value) for key, value in options.items()},
        )

    return build


BASELINES = {
    b.name: b
    for b in (
        Baseline(
            "kj-muon",
            "muon-optimizer==0.1.0",
            "muon",
            "Keller Jordan's Muon (SingleDeviceMuonWithAuxAdam)",
            _keller_jordan,
            takes_matrices=True,
        ),
        Baseline(
            "po-muon",
            "pytorch-optimizer==4.1.0",
            "pytorch_optimizer",
            "pytorch_optimizer.Muon",
            _pytorch_optimizer("Muon", momentum="momentum"),
        ),
        Baseline(
            "po-adamuon",
            "pytorch-optimizer==4.1.0",
            "pytorch_optimizer",
            "pytorch_optimizer.AdaMuon",
            _pytorch_optimizer("AdaMuon"),
        ),
        Baseline(
            "po-normuon",
            "pytorch-optimizer==4.1.0",
            "pytorch_optimizer",
            "pytorch_optimizer.NorMuon",
            _pytorch_optimizer("NorMuon", momentum="momentum"),
        ),
    )
}


def available(name: str) -> bool:
    """Whether the package of baseline ``name`` is installed."""
    try:
        importlib.import_module(BASELINES[name].module)
    except ImportError:
        return False
    return True


def build_baseline(name: str, model: nn.Module, args, lr: float):
    """Baseline ``name`` over ``model`` at Muon lr ``lr`` (see the module docstring); a clear
    error naming the package when it is not installed."""
    baseline = BASELINES[name]
    try:
        module = importlib.import_module(baseline.module)
    except ImportError as error:
        raise RuntimeError(
            f"--optimizers {name} needs the package {baseline.package.split('==')[0]}: "
            f'pip install "{baseline.package}" (or pip install "dropmuon[baselines]")'
        ) from error
    if baseline.takes_matrices:
        flatten_conv_kernels(model)
    muon, rest = hidden_matrices(model)
    return baseline.build(module, muon, rest, lr, args)
