"""torch.ops.dropmuon.muon_update_, the fused update: opcheck (CPU and CUDA), the CPU kernel
against the pure-PyTorch reference (every option, dtype and shape), NaN/Inf leaving everything
untouched and zero gradients giving zero updates on every device (on CPU also the reference),
bad lists and hyperparameters, and the CUDA kernels against float64 and the CPU kernel: the paper
CNN's layer shapes, batches past one launch, every route (skipped without a GPU).

`-k small`: the quick every-kernel subset (what benchmarks/gpu/run.sh hands to compute-sanitizer).
"""

import pytest
import torch
from op_cases import (
    DEVICES,
    DTYPES,
    FP32_BF16,
    NORMS,
    UPDATE_OPTIONS,
    make_lists,
    requires_cuda,
    requires_extension,
    shape_id,
    small_every_kernel,
    update_kwargs,
)

from dropmuon import reference

pytestmark = requires_extension


# --------------------------------------------------------------------------------------------
# opcheck: schema, fake implementations, autograd registration, aot dispatch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_duals", [False, True], ids=["no-duals", "duals"])
@pytest.mark.parametrize("radius", ["fixed", "adaptive"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_muon_update(device, radius, with_duals):
    params, grads, bufs = make_lists((6, 10), torch.float32, device)
    kwargs = update_kwargs(radius=radius, with_duals=with_duals)
    torch.library.opcheck(torch.ops.dropmuon.muon_update_.default, (params, grads, bufs), kwargs)


# --------------------------------------------------------------------------------------------
# The CPU kernel equals the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 64), (64, 7), (16, 3, 3, 3), (10,), ()], ids=shape_id)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(nesterov=False, adjust_lr_fn="match_rms_adamw"),
        dict(radius="adaptive", adjust_lr_fn="none"),
        dict(norm="sign"),
        dict(norm="row", momentum=0.0),
        dict(norm="column", weight_decay=0.0),
        dict(norm="frobenius"),
        dict(ns_precision="bfloat16"),
    ],
    ids=["default", "no-nesterov-rms", "adaptive", "sign", "row", "column", "frobenius", "ns-bf16"],
)
def test_muon_update_matches_reference(options, dtype, shape):
    dt = DTYPES[dtype]
    make = [[torch.randn(shape, dtype=torch.float64).to(dt) for _ in range(3)] for _ in range(3)]
    params, grads, bufs = make
    ref_params = [p.clone() for p in params]
    ref_bufs = [b.clone() for b in bufs]
    kwargs = update_kwargs(**options)
    duals = torch.ops.dropmuon.muon_update_(params, grads, bufs, **kwargs)
    ref_duals = reference.muon_update_(ref_params, grads, ref_bufs, **kwargs)
    tol = {"fp32": 1e-4, "fp64": 1e-10, "bf16": 3e-2}[dtype]
    if options.get("ns_precision") == "bfloat16":
        tol = max(tol, 3e-2 * kwargs["lr"])  # the update rounds like bf16; params move by ~lr
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=tol, atol=tol)
    for b, r in zip(bufs, ref_bufs):
        torch.testing.assert_close(b, r, rtol=tol, atol=tol)
    # Muon's quintic is not contractive near sigma = 1 (slopes up to ~3.4), so bfloat16
    # rounding of the iterates moves the dual by a few percent.
    dual_tol = 0.1 if options.get("ns_precision") == "bfloat16" else max(tol, 1e-4)
    torch.testing.assert_close(duals, ref_duals, rtol=dual_tol, atol=1e-6)


# --------------------------------------------------------------------------------------------
# NaN/Inf, zeros
# --------------------------------------------------------------------------------------------


def test_muon_update_nonfinite_leaves_everything_untouched():
    params = [torch.randn(5, 8) for _ in range(2)]
    grads = [torch.randn(5, 8) for _ in range(2)]
    bufs = [torch.randn(5, 8) for _ in range(2)]
    grads[1][0, 0] = float("inf")
    before = [t.clone() for t in params + bufs]
    with pytest.raises(RuntimeError, match="DM_ERR_NONFINITE"):
        torch.ops.dropmuon.muon_update_(params, grads, bufs, **update_kwargs())
    for t, b in zip(params + bufs, before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("device", DEVICES)
def test_muon_update_nonfinite_raises_for_every_norm(device, bad, norm):
    params, grads, bufs = make_lists((6, 9), torch.float32, device)
    grads[2][0, 0] = bad
    before = [t.clone() for t in params + bufs]
    with pytest.raises(RuntimeError, match="DM_ERR_NONFINITE"):
        torch.ops.dropmuon.muon_update_(params, grads, bufs, **update_kwargs(norm=norm))
    for t, b in zip(params + bufs, before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", FP32_BF16)
@pytest.mark.parametrize(
    "device, implementation",
    [("cpu", "kernel"), ("cpu", "reference"), pytest.param("cuda", "kernel", marks=requires_cuda)],
    ids=["cpu", "cpu-reference", "cuda"],
)
def test_zero_gradients_give_zero_updates(device, implementation, dtype, norm):
    # Zero gradients and buffers, adaptive radius with L0 = 0: the step is 0 (no 0 / 0), so the
    # parameters are only decayed.
    update = {"kernel": torch.ops.dropmuon.muon_update_, "reference": reference.muon_update_}
    params = [torch.randn(5, 9).to(DTYPES[dtype]).to(device) for _ in range(2)]
    zeros = [torch.zeros_like(p) for p in params]
    before = [p.clone() for p in params]
    kwargs = update_kwargs(norm=norm, radius="adaptive", L0=0.0, L1=1.0)
    duals = update[implementation](params, zeros, [z.clone() for z in zeros], **kwargs)
    decay = 1 - kwargs["lr"] * kwargs["weight_decay"]
    for p, b in zip(params, before):
        assert torch.equal(p, b * decay)
    assert torch.equal(duals.cpu(), torch.zeros(2).double())


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p, g, b: g.pop(), "same length"),
        (lambda p, g, b: g.__setitem__(0, torch.randn(5, 9)), r"grads\[0\] has shape"),
        (lambda p, g, b: b.__setitem__(1, torch.randn(5, 8).double()), r"momentum_buffers\[1\]"),
        (lambda p, g, b: p.__setitem__(1, torch.randn(8, 5).t()), r"params\[1\] must be contig"),
        (lambda p, g, b: [p.__setitem__(i, p[i].half()) for i in range(2)], "dtype"),
    ],
    ids=["length", "grad-shape", "buffer-dtype", "noncontiguous", "fp16"],
)
def test_muon_update_rejects_bad_lists(mutate, message):
    params = [torch.randn(5, 8) for _ in range(2)]
    grads = [torch.randn(5, 8) for _ in range(2)]
    bufs = [torch.randn(5, 8) for _ in range(2)]
    mutate(params, grads, bufs)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dropmuon.muon_update_(params, grads, bufs, **update_kwargs())


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(norm="nuclear"), "unknown norm"),
        (dict(adjust_lr_fn="sqrt"), "unknown adjust_lr_fn"),
        (dict(radius="auto"), "unknown radius"),
        (dict(ns_coefficients=[1.0, 2.0]), "whole"),
        (dict(lr=-1.0), "DM_ERR_INVALID_ARG"),
        (dict(momentum=1.5), "DM_ERR_INVALID_ARG"),
    ],
    ids=["norm", "adjust", "radius", "triples", "lr", "momentum"],
)
def test_muon_update_rejects_bad_hyperparameters(override, message):
    params, grads, bufs = ([torch.randn(5, 8)] for _ in range(3))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dropmuon.muon_update_(params, grads, bufs, **update_kwargs(**override))


# --------------------------------------------------------------------------------------------
# CUDA: against float64 and the CPU kernel
# --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize(
    "shape",
    [(64, 1, 3, 3), (128, 64, 3, 3), (10, 2304), (10,), (), (7, 64), (64, 7), (3, 4097)],
    ids=shape_id,
)
@pytest.mark.parametrize("dtype", FP32_BF16)
@pytest.mark.parametrize("options", list(UPDATE_OPTIONS))
def test_muon_update_matches_float64_and_cpu(options, dtype, shape):
    dt = DTYPES[dtype]
    params, grads, bufs = make_lists(shape, dt, "cuda")
    cpu_params, cpu_bufs = [p.cpu() for p in params], [b.cpu() for b in bufs]
    ref_params, ref_bufs = [p.double() for p in params], [b.double() for b in bufs]
    kwargs = update_kwargs(**UPDATE_OPTIONS[options])
    duals = torch.ops.dropmuon.muon_update_(params, grads, bufs, **kwargs)
    cpu_duals = torch.ops.dropmuon.muon_update_(
        cpu_params, [g.cpu() for g in grads], cpu_bufs, **kwargs
    )
    ref_duals = reference.muon_update_(ref_params, [g.double() for g in grads], ref_bufs, **kwargs)
    # Momentum is elementwise and rounds exactly where the C core rounds: the same bits.
    for b, c in zip(bufs, cpu_bufs):
        assert torch.equal(b.cpu(), c)
    # Against float64: the storage dtype's rounding, plus bfloat16 iterates where asked.
    tol = {"fp32": 1e-4, "bf16": 3e-2}[dtype]
    if kwargs["ns_precision"] == "bfloat16":
        tol = max(tol, 3e-2 * kwargs["lr"])
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.double().cpu(), r.cpu(), rtol=tol, atol=tol)
    # Against the CPU kernel: only the Newton-Schulz products differ (the rest is bit for bit).
    step_tol = {"fp32": 1e-5, "bf16": 2.0**-7}[dtype] + (
        kwargs["lr"] * 0.05 if kwargs["ns_precision"] == "bfloat16" else 0.0
    )
    for p, c in zip(params, cpu_params):
        torch.testing.assert_close(p.cpu(), c, rtol=step_tol, atol=step_tol)
    # float64 keeps M' unrounded; bfloat16 storage rounds it (~2^-9), which moves the dual.
    dual_tol = 0.1 if kwargs["ns_precision"] == "bfloat16" else {"fp32": 1e-4, "bf16": 1e-2}[dtype]
    torch.testing.assert_close(duals.cpu(), ref_duals.cpu(), rtol=dual_tol, atol=1e-6)
    torch.testing.assert_close(duals.cpu(), cpu_duals, rtol=dual_tol, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("dtype", FP32_BF16)
@pytest.mark.parametrize("norm", ["spectral", "row", "column"])
def test_muon_update_batches_past_one_launch(norm, dtype):
    """70 tensors: two launches of at most 64 each, in every pass."""
    params, grads, bufs = make_lists((5, 12), DTYPES[dtype], "cuda", count=70)
    cpu = [[t.cpu() for t in ts] for ts in (params, grads, bufs)]
    kwargs = update_kwargs(norm=norm, radius="adaptive")
    duals = torch.ops.dropmuon.muon_update_(params, grads, bufs, **kwargs)
    cpu_duals = torch.ops.dropmuon.muon_update_(*cpu, **kwargs)
    for a, b in zip(params + bufs, cpu[0] + cpu[2]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=2.0**-7)
    torch.testing.assert_close(duals.cpu(), cpu_duals, rtol=1e-4, atol=1e-6)


@small_every_kernel
def test_muon_update_small_every_kernel_against_cpu(shape, batch, dt, norm, ns_precision):
    """Quick: every update pass, chunking and route on small inputs (compute-sanitizer)."""
    loose = ns_precision == "bfloat16" or dt == torch.bfloat16
    params, grads, bufs = make_lists(shape, dt, "cuda", count=batch)
    cpu = [[t.cpu() for t in ts] for ts in (params, grads, bufs)]
    kwargs = update_kwargs(norm=norm, ns_precision=ns_precision, radius="adaptive")
    torch.ops.dropmuon.muon_update_(params, grads, bufs, **kwargs)
    torch.ops.dropmuon.muon_update_(*cpu, **kwargs)
    for a, b in zip(bufs, cpu[2]):
        assert torch.equal(a.cpu(), b)
    for a, b in zip(params, cpu[0]):
        torch.testing.assert_close(
            a.cpu(), b, rtol=2e-2 if loose else 1e-5, atol=2e-2 if loose else 1e-5
        )
