"""A prototype of a CUDA-graph-capturable DropMuon step, for the GPU test and benchmark.

Not part of the library: ``torch.ops.dropmuon._muon_update_capturable_`` is an experimental op
(hyperparameters read from a device tensor, errors reported into a status tensor instead of
raised) that no public API exposes until it has run on real hardware. This is the optimizer
change it would take, as one class that ``tests/python/test_cuda_graph.py`` and
``benchmarks/gpu/bench_gpu.py`` both use.
"""

from __future__ import annotations

import torch

from dropmuon import ops
from dropmuon.step import update as functional
from dropmuon.update_rules import UpdateArguments

# The keywords of muon_update_ that the capturable op reads from its float64 [5] tensor.
DEVICE_HYPERPARAMETERS = ("lr", "weight_decay", "momentum", "L0", "L1")
DM_ERR_NONFINITE = 5


class CapturedStep:
    """DropMuon.step for a fixed set of active layers (``active``: a mask by position, or None
    for all) through ``_muon_update_capturable_``: one float64 hyperparameter tensor per group
    (``hyper[id(group)]``, editable between replays, e.g. the lr) and one int32 ``status`` for
    the whole step, all-or-nothing: the gradients are screened on the device first, and a
    nonzero status gates every update. Parameters on ``"adamw"`` are not covered."""

    def __init__(self, optimizer, active=None):
        device = next(p for g in optimizer.param_groups for p in g["params"]).device
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        self.hyper, self.calls, self.grads = {}, [], []
        for group in optimizer.param_groups:
            schedule = ops.ns_schedule(group["ns_coefficients"], group["ns_steps"])
            buckets = {}
            for p in group["params"]:
                if active is not None and not active[optimizer.layer_of(p)]:
                    continue
                norm = optimizer.norm_of(p)
                if norm == "adamw" or p.grad is None:
                    raise ValueError("CapturedStep needs gradients and no 'adamw' parameters")
                functional.momentum_buffer(optimizer.state[p], p)
                buckets.setdefault((norm, tuple(p.shape), p.dtype), []).append(p)
                self.grads.append(p.grad)
            for (norm, _, _), params in buckets.items():
                keywords = UpdateArguments.of_group(group, norm, schedule).op_keywords()
                values = [keywords.pop(k) for k in DEVICE_HYPERPARAMETERS]
                if id(group) not in self.hyper:
                    self.hyper[id(group)] = torch.tensor(values, dtype=torch.float64, device=device)
                bufs = [optimizer.state[p]["momentum_buffer"] for p in params]
                grads = [p.grad for p in params]
                self.calls.append((params, grads, bufs, self.hyper[id(group)], keywords))

    def __call__(self):
        norms = torch._foreach_norm(self.grads, float("inf"))
        bad = ~torch.isfinite(torch.stack(norms)).all()
        self.status.masked_fill_(bad, DM_ERR_NONFINITE)  # the gate then stops every update
        for params, grads, bufs, hyper, keywords in self.calls:
            torch.ops.dropmuon._muon_update_capturable_(
                params, grads, bufs, hyper, self.status, **keywords
            )
