"""What the operator tests (tests/python/test_op_*.py, test_cuda_graph.py) share: the devices,
dtypes, norms and update options they run over, the operators' arguments, and error measures.

Imported as a plain module (``import op_cases``): pytest puts tests/python on sys.path.
"""

import os
import sys

import pytest
import torch

from dropmuon import ops

# The capture prototype (shared with the GPU benchmark, not part of the library) and the split
# of the capturable op's keywords live in benchmarks/gpu/captured_step.py.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "gpu"))
from captured_step import DEVICE_HYPERPARAMETERS, CapturedStep  # noqa: E402, F401

requires_extension = pytest.mark.skipif(
    ops.EXTENSION_ERROR is not None, reason="extension not built"
)
CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
# CPU always, CUDA when present.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
FP32_BF16 = ["fp32", "bf16"]  # the storage dtypes of the CUDA kernels' tests
NORMS = ["spectral", "sign", "column", "row", "frobenius"]
MUON = list(ops.MUON_COEFFICIENTS) * 5  # ops.ns_schedule("muon", 5): norm_scale 1, offset 0

UPDATE_OPTIONS = {
    "default": dict(),
    "no-nesterov-rms": dict(nesterov=False, adjust_lr_fn="match_rms_adamw"),
    "adaptive": dict(radius="adaptive", adjust_lr_fn="none"),
    "sign": dict(norm="sign"),
    "row": dict(norm="row", momentum=0.0),
    "column": dict(norm="column", weight_decay=0.0),
    "frobenius": dict(norm="frobenius", momentum=0.5),
    "ns-bf16": dict(ns_precision="bfloat16"),
}

# Routes of the Newton-Schulz products (dm_cuda_tuning through the shim's environment knobs).
ROUTES = {
    "default": {},
    "batched": {"DROPMUON_CUDA_BATCHED_MAX_P": "100000"},
    "cublas": {"DROPMUON_CUDA_BATCHED_MAX_P": "0", "DROPMUON_CUDA_SYMMETRIC_MIN_P": "0"},
    "cublas-split": {"DROPMUON_CUDA_BATCHED_MAX_P": "0", "DROPMUON_CUDA_SYMMETRIC_MIN_P": "2"},
}
# The `-k small` subset (what benchmarks/gpu/run.sh hands to compute-sanitizer): every norm on
# the default route, and spectral (the only norm with Newton-Schulz products) on every route.
SMALL_SHAPES = [(3, 5), (37, 11)]
SMALL_NORM_ROUTES = [
    pytest.param(norm, route, id=f"{norm}-{route}")
    for norm in NORMS
    for route in ROUTES
    if norm == "spectral" or route == "default"
]


def small_every_kernel(check):
    """The `-k small` grid on CUDA as a test: ``check(shape, batch, dtype, norm, ns_precision)``
    runs for every shape, batch (one launch and two), storage dtype and norm/route pair (the
    route set for it), and every Newton-Schulz iterate precision the norm has."""

    def test(monkeypatch, shape, batch, dtype, norm, route):
        set_route(monkeypatch, route)
        for ns_precision in ("native", "bfloat16") if norm == "spectral" else ("native",):
            check(shape, batch, DTYPES[dtype], norm, ns_precision)

    test.__name__, test.__doc__ = check.__name__, check.__doc__
    marks = [
        requires_cuda,
        pytest.mark.parametrize("norm, route", SMALL_NORM_ROUTES),
        pytest.mark.parametrize("dtype", FP32_BF16),
        pytest.mark.parametrize("batch", [1, 70]),
        pytest.mark.parametrize("shape", SMALL_SHAPES, ids=shape_id),
    ]
    for mark in reversed(marks):  # applied bottom-up, as stacked decorators are
        test = mark(test)
    return test


def shape_id(shape):
    return "x".join(map(str, shape)) or "scalar"


def sharp_args(x, norm="spectral", coefficients=None, ns_precision="native"):
    """The positional arguments of torch.ops.dropmuon.sharp (Muon's schedule by default)."""
    return (x, norm, list(coefficients or MUON), 1.0, 0.0, 1e-7, ns_precision)


def update_kwargs(**overrides):
    kwargs = dict(
        lr=0.05,
        weight_decay=0.1,
        momentum=0.9,
        nesterov=True,
        norm="spectral",
        ns_coefficients=MUON,
        norm_scale=1.0,
        norm_offset=0.0,
        eps=1e-7,
        ns_precision="native",
        adjust_lr_fn="original",
        radius="fixed",
        L0=1.0,
        L1=0.5,
        with_duals=True,
    )
    kwargs.update(overrides)
    return kwargs


def capturable_kwargs(kwargs):
    """muon_update_'s keywords split into the five values that travel in the tensor and the
    rest (_muon_update_capturable_'s keywords)."""
    hyper = [kwargs[k] for k in DEVICE_HYPERPARAMETERS]
    rest = {k: v for k, v in kwargs.items() if k not in DEVICE_HYPERPARAMETERS}
    return hyper, rest


def make_lists(shape, dtype, device, count=3, scale=1.0):
    """params, grads, momentum buffers: count tensors each, drawn in float64."""
    return [
        [
            (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)
            for _ in range(count)
        ]
        for _ in range(3)
    ]


def set_route(monkeypatch, route):
    for name in ("DROPMUON_CUDA_BATCHED_MAX_P", "DROPMUON_CUDA_SYMMETRIC_MIN_P"):
        monkeypatch.delenv(name, raising=False)
    for name, value in ROUTES[route].items():
        monkeypatch.setenv(name, value)


def max_error(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def relative_error(out, ref):
    out, ref = out.double(), ref.double().to(out.device)
    return (
        torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp(min=1e-300)
    ).item()
