"""torch.ops.dropmuon.sharp: opcheck (CPU and CUDA), the CPU kernel against the pure-PyTorch
reference (every norm and dtype, bfloat16 iterates, Polar Express), zero input, NaN/Inf and
optional duals on every device, and the CUDA kernels against float64 and the CPU kernel: the
paper CNN's layer shapes and odd sizes, every route of the Newton-Schulz products, convergence
to the polar factor, batches past one launch (skipped without a GPU).

`-k small`: the quick every-kernel subset (what benchmarks/gpu/run.sh hands to compute-sanitizer).
"""

import pytest
import torch
from op_cases import (
    DEVICES,
    DTYPES,
    FP32_BF16,
    NORMS,
    ROUTES,
    max_error,
    relative_error,
    requires_cuda,
    requires_extension,
    set_route,
    shape_id,
    sharp_args,
    small_every_kernel,
    update_kwargs,
)

import dropmuon
from dropmuon import ops, reference

pytestmark = requires_extension

SHAPES = [(1, 1), (1, 7), (7, 64), (64, 7), (64, 64), (3, 4097), (33, 96)]
# The paper CNN's matrices as the optimizer sees them: conv kernels as out x (in*3*3), the head.
CNN_SHAPES = [(64, 9), (128, 576), (256, 1152), (10, 2304)]
ODD_SHAPES = [(1, 1), (1, 7), (7, 1), (7, 64), (64, 7), (3, 4097), (4097, 3)]


# --------------------------------------------------------------------------------------------
# opcheck: schema, fake implementations, autograd registration, aot dispatch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", FP32_BF16)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_sharp(device, dtype, norm):
    x = torch.randn(2, 7, 12, dtype=DTYPES[dtype], device=device)
    torch.library.opcheck(torch.ops.dropmuon.sharp.default, sharp_args(x, norm))
    torch.library.opcheck(
        torch.ops.dropmuon.sharp.default,
        sharp_args(x, norm, ns_precision="bfloat16"),
        {"with_duals": False},
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_sharp_bfloat16_iterates(device):
    x = torch.randn(2, 12, 7, device=device)
    args = sharp_args(x, ns_precision="bfloat16")
    torch.library.opcheck(torch.ops.dropmuon.sharp.default, args)


# --------------------------------------------------------------------------------------------
# The CPU kernel equals the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("norm", NORMS)
def test_sharp_matches_reference(norm, dtype, shape):
    x = torch.randn(3, *shape, dtype=torch.float64)
    x_low = x.to(DTYPES[dtype])
    out, duals = torch.ops.dropmuon.sharp(*sharp_args(x_low, norm))
    ref, ref_duals = reference.sharp(*sharp_args(x_low, norm))
    exact, _ = reference.sharp(*sharp_args(x_low.double(), norm))  # float64 ground truth
    assert out.dtype == x_low.dtype and out.shape == x_low.shape
    if dtype == "fp64":
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    else:
        # Same-dtype results may differ by rounding order; bound ours by a multiple of the
        # reference's own error against float64 (plus one ulp of the output scale).
        ulp = {"fp32": 2.0**-23, "bf16": 2.0**-8}[dtype]
        scale = exact.abs().max().item()
        assert max_error(out, exact) <= 2 * max_error(ref, exact) + 4 * ulp * scale
    torch.testing.assert_close(duals, ref_duals, rtol=2e-2 if dtype == "bf16" else 1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(7, 64), (64, 7), (33, 96)], ids=shape_id)
@pytest.mark.parametrize("dtype", FP32_BF16)
def test_sharp_bfloat16_iterates_match_reference(dtype, shape):
    x = torch.randn(3, *shape).to(DTYPES[dtype])
    out, duals = torch.ops.dropmuon.sharp(*sharp_args(x, ns_precision="bfloat16"))
    ref, ref_duals = reference.sharp(*sharp_args(x, ns_precision="bfloat16"))
    exact, _ = reference.sharp(*sharp_args(x.double()))
    # Both round their iterates to bfloat16: compare their errors against float64 iterates.
    assert max_error(out, exact) <= 2 * max_error(ref, exact) + 1e-3
    assert max_error(out, exact) < 0.05
    torch.testing.assert_close(duals, ref_duals, rtol=2e-2, atol=1e-6)


def test_sharp_spectral_polar_express_is_closer_to_the_polar_factor():
    x = torch.randn(64, 256, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    polar = u @ vh
    muon, _ = dropmuon.sharp(x.float(), ns_coefficients="muon")
    pe, _ = dropmuon.sharp(x.float(), ns_coefficients="polar_express")
    err_muon = torch.linalg.matrix_norm(muon.double() - polar, ord=2).item()
    err_pe = torch.linalg.matrix_norm(pe.double() - polar, ord=2).item()
    assert err_pe < err_muon
    assert err_muon < 0.5


# --------------------------------------------------------------------------------------------
# Zeros, NaN/Inf, optional duals
# --------------------------------------------------------------------------------------------


def test_sharp_zero_and_nonfinite():
    out, duals = dropmuon.sharp(torch.zeros(2, 5, 9))
    assert torch.equal(out, torch.zeros(2, 5, 9)) and torch.equal(duals, torch.zeros(2).double())
    x = torch.randn(2, 5, 9)
    x[1, 2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="DM_ERR_NONFINITE"):
        torch.ops.dropmuon.sharp(*sharp_args(x))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", FP32_BF16)
@pytest.mark.parametrize("device", DEVICES)
def test_sharp_zero_matrices_give_zeros(device, dtype, norm):
    x = torch.zeros(2, 5, 9, dtype=DTYPES[dtype], device=device)
    out, duals = torch.ops.dropmuon.sharp(*sharp_args(x, norm))
    assert torch.equal(out, torch.zeros_like(x)) and torch.equal(
        duals.cpu(), torch.zeros(2).double()
    )


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("device", DEVICES)
def test_sharp_nonfinite_raises(device, bad, norm):
    x = torch.randn(3, 6, 9, device=device)
    x[1, 2, 3] = bad
    with pytest.raises(RuntimeError, match="DM_ERR_NONFINITE"):
        torch.ops.dropmuon.sharp(*sharp_args(x, norm))


def test_duals_are_optional():
    x = torch.randn(2, 6, 9)
    out, duals = torch.ops.dropmuon.sharp(*sharp_args(x), with_duals=False)
    full, full_duals = torch.ops.dropmuon.sharp(*sharp_args(x))
    assert duals.shape == (0,) and full_duals.shape == (2,) and torch.equal(out, full)
    params, grads, bufs = ([torch.randn(5, 8)] for _ in range(3))
    kwargs = update_kwargs(with_duals=False)
    assert torch.ops.dropmuon.muon_update_(params, grads, bufs, **kwargs).shape == (0,)
    torch.library.opcheck(torch.ops.dropmuon.sharp.default, sharp_args(x), {"with_duals": False})


# --------------------------------------------------------------------------------------------
# CUDA: the elementwise norms repeat the C core's arithmetic
# --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("shape", CNN_SHAPES + ODD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", FP32_BF16)
@pytest.mark.parametrize("norm", ["sign", "column", "row", "frobenius"])
def test_sharp_elementwise_norms(norm, dtype, shape):
    x = torch.randn(3, *shape, dtype=torch.float64).to(DTYPES[dtype])
    out, duals = torch.ops.dropmuon.sharp(*sharp_args(x.cuda(), norm))
    cpu, cpu_duals = torch.ops.dropmuon.sharp(*sharp_args(x, norm))
    exact, exact_duals = reference.sharp(*sharp_args(x.double(), norm))
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_cuda
    # Same formula as the CPU kernel; only the order of the norms' sums differs: one rounding.
    ulp = {"fp32": 2.0**-23, "bf16": 2.0**-8}[dtype]
    scale = exact.abs().max().item()
    assert max_error(out, cpu) <= ulp * scale
    assert max_error(out, exact) <= max_error(cpu, exact) + ulp * scale
    torch.testing.assert_close(duals.cpu(), exact_duals, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(duals.cpu(), cpu_duals, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# CUDA: Newton-Schulz on every route, against float64 Newton-Schulz and the polar factor
# --------------------------------------------------------------------------------------------


def spectral_tolerance(dtype, ns_precision):
    return 1e-4 if dtype == "fp32" and ns_precision == "native" else None


@requires_cuda
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shape", CNN_SHAPES + ODD_SHAPES, ids=shape_id)
@pytest.mark.parametrize(
    "dtype, ns_precision",
    [("fp32", "native"), ("fp32", "bfloat16"), ("bf16", "native"), ("bf16", "bfloat16")],
    ids=["fp32", "fp32-bf16iter", "bf16", "bf16-bf16iter"],
)
def test_sharp_spectral_matches_float64(dtype, ns_precision, shape, batch):
    x = torch.randn(batch, *shape, dtype=torch.float64).to(DTYPES[dtype]).cuda()
    out, duals = torch.ops.dropmuon.sharp(*sharp_args(x, ns_precision=ns_precision))
    exact, exact_duals = reference.sharp(*sharp_args(x.double()))  # float64 on the GPU
    tol = spectral_tolerance(dtype, ns_precision)
    if tol is not None:
        assert relative_error(out, exact) < tol
        torch.testing.assert_close(duals, exact_duals, rtol=1e-4, atol=1e-6)
        return
    # bfloat16 somewhere: bound ours by torch.optim.Muon's own bfloat16 error (same dtype)
    from torch.optim._muon import _zeropower_via_newtonschulz

    for b in range(batch):
        torch_ns = _zeropower_via_newtonschulz(x[b], ops.MUON_COEFFICIENTS, 5, 1e-7)
        ours, truth = relative_error(out[b], exact[b]), relative_error(torch_ns, exact[b])
        assert ours <= 2 * truth + 1e-2, (ours, truth)
    torch.testing.assert_close(duals, exact_duals, rtol=0.1, atol=1e-3)


def well_conditioned(batch, rows, cols, dtype):
    """M = U diag(s) V^T with s in [0.2, 1] stored in dtype, and the polar factor of the stored
    M by a float64 SVD."""
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(batch, rows, k, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(batch, cols, k, dtype=torch.float64)).Q
    s = torch.rand(batch, k, dtype=torch.float64) * 0.8 + 0.2
    m = (u @ torch.diag_embed(s) @ v.mT).to(dtype)
    left, _, right = torch.linalg.svd(m.double(), full_matrices=False)
    return m, left @ right


# The cubic Newton-Schulz X <- 1.5 X - 0.5 X X^T X converges to the polar factor.
CUBIC = [1.5, -0.5, 0.0] * 30


@requires_cuda
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    "shape", [(7, 64), (64, 7), (33, 96), (128, 576), (300, 700), (1, 4097)], ids=shape_id
)
@pytest.mark.parametrize(
    "dtype, ns_precision", [("fp32", "native"), ("bf16", "bfloat16")], ids=["fp32", "bf16"]
)
def test_sharp_spectral_converges_to_polar_factor(monkeypatch, route, dtype, ns_precision, shape):
    set_route(monkeypatch, route)
    m, polar = well_conditioned(2, *shape, DTYPES[dtype])
    out, _ = torch.ops.dropmuon.sharp(*sharp_args(m.cuda(), "spectral", CUBIC, ns_precision))
    error = relative_error(out, polar.cuda())
    assert error < (1e-4 if dtype == "fp32" else 2e-2), error


@requires_cuda
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    "dtype, ns_precision", [("fp32", "native"), ("bf16", "bfloat16")], ids=["fp32", "bf16"]
)
def test_sharp_spectral_large_routes_agree(monkeypatch, route, dtype, ns_precision):
    """2304 >= the default split threshold: cuBLAS by blocks on the default route."""
    set_route(monkeypatch, route)
    x = torch.randn(1, 2304, 2560, dtype=torch.float64).to(DTYPES[dtype]).cuda()
    out, duals = torch.ops.dropmuon.sharp(*sharp_args(x, ns_precision=ns_precision))
    exact, exact_duals = reference.sharp(*sharp_args(x.double()))
    if dtype == "fp32":
        assert relative_error(out, exact) < 1e-3
        torch.testing.assert_close(duals, exact_duals, rtol=1e-4, atol=0)
        return
    from torch.optim._muon import _zeropower_via_newtonschulz

    truth = relative_error(
        _zeropower_via_newtonschulz(x[0], ops.MUON_COEFFICIENTS, 5, 1e-7), exact[0]
    )
    assert relative_error(out, exact) <= 2 * truth + 1e-2
    torch.testing.assert_close(duals, exact_duals, rtol=0.1, atol=0)


# --------------------------------------------------------------------------------------------
# CUDA: batches and the quick every-kernel subset, against the CPU kernel
# --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", FP32_BF16)
@pytest.mark.parametrize("norm", ["spectral", "row", "column"])
def test_sharp_batches_past_one_launch(norm, dtype):
    """70 matrices: two launches of at most 64 each, in every pass."""
    x = torch.randn(70, 12, 5).to(DTYPES[dtype])
    out, d = torch.ops.dropmuon.sharp(*sharp_args(x.cuda(), norm))
    ref, ref_d = torch.ops.dropmuon.sharp(*sharp_args(x, norm))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=2.0**-7)
    torch.testing.assert_close(d.cpu(), ref_d, rtol=1e-4, atol=1e-6)


@small_every_kernel
def test_sharp_small_every_kernel_against_cpu(shape, batch, dt, norm, ns_precision):
    """Quick: every sharp pass, chunking and route on small inputs (compute-sanitizer)."""
    x = torch.randn(batch, *shape).to(dt)
    out, d = torch.ops.dropmuon.sharp(*sharp_args(x.cuda(), norm, ns_precision=ns_precision))
    ref, ref_d = torch.ops.dropmuon.sharp(*sharp_args(x, norm, ns_precision=ns_precision))
    loose = ns_precision == "bfloat16" or dt == torch.bfloat16
    torch.testing.assert_close(
        out.cpu(), ref, rtol=5e-2 if loose else 1e-4, atol=5e-2 if loose else 1e-5
    )
    torch.testing.assert_close(d.cpu(), ref_d, rtol=0.1 if loose else 1e-4, atol=1e-6)
