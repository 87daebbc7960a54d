"""The CUDA operators (csrc/cuda, csrc/torch/cuda.cu) against float64 references and the CPU
kernels: every operator and norm, float32 and bfloat16, the paper CNN's layer shapes and odd sizes,
batches (also past one launch's 64 tensors), zeros and NaN, every route of the Newton-Schulz
products, CUDA-graph capture of a whole optimizer step, and opcheck on CUDA tensors.

Skipped without a GPU, except the CPU half of _muon_update_capturable_ (parametrized by device).
`-k small` selects a quick subset that covers every kernel (what run.sh hands to
compute-sanitizer).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from dropmuon import DropMuon, ops, reference
from dropmuon.compare.models import PaperCNN

pytestmark = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason="extension not built")

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NORMS = ["spectral", "sign", "column", "row", "frobenius"]
MUON = list(ops.MUON_COEFFICIENTS) * 5
# The paper CNN's matrices as the optimizer sees them: conv kernels as out x (in*3*3), the head.
CNN_SHAPES = [(64, 9), (128, 576), (256, 1152), (10, 2304)]
ODD_SHAPES = [(1, 1), (1, 7), (7, 1), (7, 64), (64, 7), (3, 4097), (4097, 3)]
# Routes of the Newton-Schulz products (dm_cuda_tuning through the shim's environment knobs).
ROUTES = {
    "default": {},
    "batched": {"DROPMUON_CUDA_BATCHED_MAX_P": "100000"},
    "cublas": {"DROPMUON_CUDA_BATCHED_MAX_P": "0", "DROPMUON_CUDA_SYMMETRIC_MIN_P": "0"},
    "cublas-split": {"DROPMUON_CUDA_BATCHED_MAX_P": "0", "DROPMUON_CUDA_SYMMETRIC_MIN_P": "2"},
}


def shape_id(shape):
    return "x".join(map(str, shape)) or "scalar"


def sharp_args(x, norm="spectral", coefficients=None, ns_precision="native"):
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
    """muon_update_'s keywords without the five values that travel in the tensor."""
    hyper = [kwargs[k] for k in ("lr", "weight_decay", "momentum", "L0", "L1")]
    rest = {
        k: v for k, v in kwargs.items() if k not in ("lr", "weight_decay", "momentum", "L0", "L1")
    }
    return hyper, rest


def relative_error(out, ref):
    out, ref = out.double(), ref.double().to(out.device)
    return (
        torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp(min=1e-300)
    ).item()


def max_error(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def set_route(monkeypatch, route):
    for name in ("DROPMUON_CUDA_BATCHED_MAX_P", "DROPMUON_CUDA_SYMMETRIC_MIN_P"):
        monkeypatch.delenv(name, raising=False)
    for name, value in ROUTES[route].items():
        monkeypatch.setenv(name, value)


def make_lists(shape, dtype, device, count=3, scale=1.0):
    return [
        [
            (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)
            for _ in range(count)
        ]
        for _ in range(3)
    ]


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


@requires_cuda
def test_extension_has_cuda_kernels():
    assert ops.has_kernel("cuda"), "the extension was built without CUDA: run setup.py with nvcc"
    for op in ("sharp", "muon_update_", "_muon_update_capturable_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dropmuon::{op}", "CUDA"), op


# --------------------------------------------------------------------------------------------
# sharp: the elementwise norms repeat the C core's arithmetic
# --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("shape", CNN_SHAPES + ODD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", list(DTYPES))
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
# sharp: Newton-Schulz on every route, against float64 Newton-Schulz and the polar factor
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
# The fused update
# --------------------------------------------------------------------------------------------

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


@requires_cuda
@pytest.mark.parametrize(
    "shape",
    [(64, 1, 3, 3), (128, 64, 3, 3), (10, 2304), (10,), (), (7, 64), (64, 7), (3, 4097)],
    ids=shape_id,
)
@pytest.mark.parametrize("dtype", list(DTYPES))
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
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_zero_matrices_give_zero_updates(norm, dtype):
    x = torch.zeros(2, 5, 9, dtype=DTYPES[dtype], device="cuda")
    out, duals = torch.ops.dropmuon.sharp(*sharp_args(x, norm))
    assert torch.equal(out, torch.zeros_like(x)) and torch.equal(
        duals.cpu(), torch.zeros(2).double()
    )
    # Zero gradients and buffers, adaptive radius with L0 = 0: the step is 0 (no 0 / 0), so the
    # parameters are only decayed.
    params = [torch.randn(5, 9).to(DTYPES[dtype]).cuda() for _ in range(2)]
    zeros = [torch.zeros_like(p) for p in params]
    before = [p.clone() for p in params]
    kwargs = update_kwargs(norm=norm, radius="adaptive", L0=0.0, L1=1.0)
    duals = torch.ops.dropmuon.muon_update_(params, zeros, [z.clone() for z in zeros], **kwargs)
    decay = 1 - kwargs["lr"] * kwargs["weight_decay"]
    for p, b in zip(params, before):
        assert torch.equal(p, b * decay)
    assert torch.equal(duals.cpu(), torch.zeros(2).double())


@requires_cuda
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_raises_and_leaves_everything_untouched(norm, bad):
    x = torch.randn(3, 6, 9, device="cuda")
    x[1, 2, 3] = bad
    with pytest.raises(RuntimeError, match="DM_ERR_NONFINITE"):
        torch.ops.dropmuon.sharp(*sharp_args(x, norm))
    params, grads, bufs = make_lists((6, 9), torch.float32, "cuda")
    grads[2][0, 0] = bad
    before = [t.clone() for t in params + bufs]
    with pytest.raises(RuntimeError, match="DM_ERR_NONFINITE"):
        torch.ops.dropmuon.muon_update_(params, grads, bufs, **update_kwargs(norm=norm))
    for t, b in zip(params + bufs, before):
        assert torch.equal(t, b)


@requires_cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("norm", ["spectral", "row", "column"])
def test_batches_past_one_launch(norm, dtype):
    """70 tensors: two launches of at most 64 each, in every pass."""
    params, grads, bufs = make_lists((5, 12), DTYPES[dtype], "cuda", count=70)
    cpu = [[t.cpu() for t in ts] for ts in (params, grads, bufs)]
    kwargs = update_kwargs(norm=norm, radius="adaptive")
    duals = torch.ops.dropmuon.muon_update_(params, grads, bufs, **kwargs)
    cpu_duals = torch.ops.dropmuon.muon_update_(*cpu, **kwargs)
    for a, b in zip(params + bufs, cpu[0] + cpu[2]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=2.0**-7)
    torch.testing.assert_close(duals.cpu(), cpu_duals, rtol=1e-4, atol=1e-6)
    x = torch.randn(70, 12, 5).to(DTYPES[dtype])
    out, d = torch.ops.dropmuon.sharp(*sharp_args(x.cuda(), norm))
    ref, ref_d = torch.ops.dropmuon.sharp(*sharp_args(x, norm))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=2.0**-7)
    torch.testing.assert_close(d.cpu(), ref_d, rtol=1e-4, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch", [1, 70])
@pytest.mark.parametrize("shape", [(3, 5), (37, 11)], ids=shape_id)
def test_small_every_kernel_against_cpu(monkeypatch, shape, batch, dtype, norm, route):
    """Quick: every pass, chunking and route on small inputs (compute-sanitizer runs this)."""
    if norm != "spectral" and route != "default":
        pytest.skip("routes only change the Newton-Schulz products")
    set_route(monkeypatch, route)
    dt = DTYPES[dtype]
    for ns_precision in ("native", "bfloat16") if norm == "spectral" else ("native",):
        x = torch.randn(batch, *shape).to(dt)
        out, d = torch.ops.dropmuon.sharp(*sharp_args(x.cuda(), norm, ns_precision=ns_precision))
        ref, ref_d = torch.ops.dropmuon.sharp(*sharp_args(x, norm, ns_precision=ns_precision))
        loose = ns_precision == "bfloat16" or dt == torch.bfloat16
        torch.testing.assert_close(
            out.cpu(), ref, rtol=5e-2 if loose else 1e-4, atol=5e-2 if loose else 1e-5
        )
        torch.testing.assert_close(d.cpu(), ref_d, rtol=0.1 if loose else 1e-4, atol=1e-6)
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


# --------------------------------------------------------------------------------------------
# _muon_update_capturable_: device hyperparameters and a status tensor (CPU and CUDA)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", ["default", "adaptive", "sign", "ns-bf16"])
def test_capturable_equals_muon_update(device, options):
    params, grads, bufs = make_lists((12, 20), torch.float32, device)
    twins = [[t.clone() for t in ts] for ts in (params, bufs)]
    kwargs = update_kwargs(**UPDATE_OPTIONS[options])
    hyper, rest = capturable_kwargs(kwargs)
    hyperparameters = torch.tensor(hyper, dtype=torch.float64, device=device)
    status = torch.zeros(1, dtype=torch.int32, device=device)
    duals = torch.ops.dropmuon._muon_update_capturable_(
        params, grads, bufs, hyperparameters, status, **rest
    )
    twin_duals = torch.ops.dropmuon.muon_update_(twins[0], grads, twins[1], **kwargs)
    assert status.item() == 0
    for a, b in zip(params + bufs, twins[0] + twins[1]):
        assert torch.equal(a, b)
    assert torch.equal(duals, twin_duals)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
def test_capturable_reports_into_status(device, norm):
    params, grads, bufs = make_lists((6, 9), torch.float32, device)
    kwargs = update_kwargs(norm=norm)
    hyper, rest = capturable_kwargs(kwargs)
    hyperparameters = torch.tensor(hyper, dtype=torch.float64, device=device)
    status = torch.zeros(1, dtype=torch.int32, device=device)
    before = [t.clone() for t in params + bufs]

    def run():
        return torch.ops.dropmuon._muon_update_capturable_(
            params, grads, bufs, hyperparameters, status, **rest
        )

    def untouched():
        return all(torch.equal(t, b) for t, b in zip(params + bufs, before))

    grads[1][2, 3] = float("nan")  # NaN: DM_ERR_NONFINITE (5), nothing written, duals NaN
    duals = run()
    assert status.item() == 5 and untouched() and duals.isnan().all()
    grads[1][2, 3] = 0.0  # a nonzero status is a gate: still nothing written, status kept
    run()
    assert status.item() == 5 and untouched()
    status.zero_()
    hyperparameters[2] = 1.5  # momentum out of [0, 1]: DM_ERR_INVALID_ARG (1)
    run()
    assert status.item() == 1 and untouched()
    status.zero_()
    hyperparameters[2] = 0.9
    run()
    assert status.item() == 0 and not untouched()


@requires_cuda
def test_capturable_rejects_bad_tensors():
    params, grads, bufs = make_lists((6, 9), torch.float32, "cuda")
    _, rest = capturable_kwargs(update_kwargs())
    status = torch.zeros(1, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="5 values"):
        torch.ops.dropmuon._muon_update_capturable_(
            params, grads, bufs, torch.zeros(4, dtype=torch.float64, device="cuda"), status, **rest
        )
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.dropmuon._muon_update_capturable_(
            params,
            grads,
            bufs,
            torch.zeros(5, dtype=torch.float64, device="cuda"),
            status.float(),
            **rest,
        )


# --------------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------------


def capture(fn):
    """fn captured in a CUDA graph after a warm-up on a side stream (torch's recipe)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


@requires_cuda
@pytest.mark.parametrize("norm", ["spectral", "row"])
def test_sharp_in_a_cuda_graph(norm):
    x = torch.randn(3, 64, 96, device="cuda")
    graph, (out, duals) = capture(lambda: torch.ops.dropmuon.sharp(*sharp_args(x, norm)))
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        ref, ref_duals = torch.ops.dropmuon.sharp(*sharp_args(x, norm))
        assert torch.equal(out, ref) and torch.equal(duals, ref_duals)
    x[0, 0, 0] = float("nan")  # inside a graph nothing can raise: the outputs stay NaN
    graph.replay()
    torch.cuda.synchronize()
    assert out.isnan().all() and duals.isnan().all()


@requires_cuda
def test_muon_update_refuses_capture():
    params, grads, bufs = make_lists((6, 9), torch.float32, "cuda")
    torch.ops.dropmuon.muon_update_(params, grads, bufs, **update_kwargs())  # warm-up
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="_muon_update_capturable_"):
        with torch.cuda.graph(graph):
            torch.ops.dropmuon.muon_update_(params, grads, bufs, **update_kwargs())


class CapturableStep:
    """DropMuon.step for a fixed set of active layers through _muon_update_capturable_, with
    device hyperparameters per group and one status for the whole step, all-or-nothing: the
    gradients are screened on the device first, and a nonzero status gates every update. This
    is the optimizer change proposed for DropMuon(capturable=True) (see the issue's report);
    parameters on fallback="adamw" are not covered here."""

    def __init__(self, optimizer, active):
        device = next(p for g in optimizer.param_groups for p in g["params"]).device
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        self.hyper = {}
        self.calls, self.grads = [], []
        for group in optimizer.param_groups:
            if not active[group["layer"]]:
                continue
            hyper = torch.tensor(
                [
                    float(group["lr"]),
                    group["weight_decay"],
                    group["momentum"],
                    group["L0"],
                    group["L1"],
                ],
                dtype=torch.float64,
                device=device,
            )
            self.hyper[id(group)] = hyper
            schedule = ops.ns_schedule(group["ns_coefficients"], group["ns_steps"])
            buckets = {}
            for p, norm in zip(group["params"], group["param_norms"]):
                assert norm != "adamw" and p.grad is not None
                state = optimizer.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buckets.setdefault((norm, tuple(p.shape), p.dtype), []).append(p)
                self.grads.append(p.grad)
            for (norm, _, _), params in buckets.items():
                adjust = group["adjust_lr_fn"] or "original"
                kwargs = dict(
                    nesterov=group["nesterov"],
                    norm=norm,
                    ns_coefficients=list(schedule.coefficients),
                    norm_scale=schedule.norm_scale,
                    norm_offset=schedule.norm_offset,
                    eps=group["eps"],
                    ns_precision=group["ns_precision"],
                    adjust_lr_fn=adjust if norm == "spectral" else "none",
                    radius=group["radius"],
                )
                bufs = [optimizer.state[p]["momentum_buffer"] for p in params]
                grads = [p.grad for p in params]
                self.calls.append((params, grads, bufs, hyper, kwargs))

    def __call__(self):
        norms = torch._foreach_norm(self.grads, float("inf"))
        bad = ~torch.isfinite(torch.stack(norms)).all()
        self.status.masked_fill_(bad, 5)  # DM_ERR_NONFINITE; the gate then stops every update
        for params, grads, bufs, hyper, kwargs in self.calls:
            torch.ops.dropmuon._muon_update_capturable_(
                params, grads, bufs, hyper, self.status, **kwargs
            )


@requires_cuda
@pytest.mark.parametrize("ns_precision", ["bfloat16", "native"])
def test_full_dropmuon_step_in_a_cuda_graph(ns_precision):
    """A whole DropMuon step (sign for vectors, spectral for kernels and head) captured once and
    replayed, against the eager optimizer step by step, lr changing between steps."""
    torch.manual_seed(0)
    model = PaperCNN().cuda()
    x = torch.randn(32, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    # A cutoff at layer 2 every step: layers 2 and 3 active, 0 and 1 frozen (no backward there).
    optimizer = DropMuon(
        model, lr=0.02, weight_decay=0.01, sampling=[0.0, 0.0, 1.0, 0.0], ns_precision=ns_precision
    )
    F.cross_entropy(model(x), y).backward()
    active = optimizer.active_layers
    assert active == [False, False, True, True]
    managed = [p for g in optimizer.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in managed]

    # Eager: three steps with three learning rates.
    lrs = [0.02, 0.05, 0.01]
    eager = []
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        eager.append([p.detach().clone() for p in managed])
    eager_state = copy.deepcopy({id(p): optimizer.state[p] for p in managed if optimizer.state[p]})

    # Captured: the same three steps as replays of one graph, from the same start.
    with torch.no_grad():
        for p, s in zip(managed, start):
            p.copy_(s)
        for p in managed:
            if "momentum_buffer" in optimizer.state[p]:
                optimizer.state[p]["momentum_buffer"].zero_()
    step = CapturableStep(optimizer, active)
    snapshot = [p.detach().clone() for p in managed]
    buffers = [optimizer.state[p]["momentum_buffer"] for p in managed if optimizer.state[p]]
    graph, _ = capture(step)
    with torch.no_grad():  # the warm-up stepped once: back to the start
        for p, s in zip(managed, snapshot):
            p.copy_(s)
        for b in buffers:
            b.zero_()
    for lr, expected in zip(lrs, eager):
        for hyper in step.hyper.values():
            hyper[0] = lr
        graph.replay()
        for p, e in zip(managed, expected):
            assert torch.equal(p, e)
    assert step.status.item() == 0
    for p in managed:
        if id(p) in eager_state:
            assert torch.equal(
                optimizer.state[p]["momentum_buffer"], eager_state[id(p)]["momentum_buffer"]
            )

    # A NaN gradient anywhere: the status says so and no layer moves (all-or-nothing).
    before = [p.detach().clone() for p in managed]
    step.grads[0][0] = float("nan")
    graph.replay()
    assert step.status.item() == 5
    assert all(torch.equal(p, b) for p, b in zip(managed, before))


# --------------------------------------------------------------------------------------------
# opcheck on CUDA tensors: schema, fake implementations, autograd registration, aot dispatch
# --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_opcheck_sharp_cuda(norm, dtype):
    x = torch.randn(2, 7, 12, dtype=DTYPES[dtype], device="cuda")
    torch.library.opcheck(torch.ops.dropmuon.sharp.default, sharp_args(x, norm))
    torch.library.opcheck(
        torch.ops.dropmuon.sharp.default,
        sharp_args(x, norm, ns_precision="bfloat16"),
        {"with_duals": False},
    )


@requires_cuda
@pytest.mark.parametrize("radius", ["fixed", "adaptive"])
def test_opcheck_muon_update_cuda(radius):
    params, grads, bufs = make_lists((6, 10), torch.float32, "cuda")
    kwargs = update_kwargs(radius=radius)
    torch.library.opcheck(torch.ops.dropmuon.muon_update_.default, (params, grads, bufs), kwargs)
    hyper, rest = capturable_kwargs(kwargs)
    args = (
        params,
        grads,
        bufs,
        torch.tensor(hyper, dtype=torch.float64, device="cuda"),
        torch.zeros(1, dtype=torch.int32, device="cuda"),
    )
    torch.library.opcheck(torch.ops.dropmuon._muon_update_capturable_.default, args, rest)


def test_opcheck_capturable_cpu():
    params, grads, bufs = make_lists((6, 10), torch.float32, "cpu")
    hyper, rest = capturable_kwargs(update_kwargs(radius="adaptive"))
    args = (
        params,
        grads,
        bufs,
        torch.tensor(hyper, dtype=torch.float64),
        torch.zeros(1, dtype=torch.int32),
    )
    torch.library.opcheck(torch.ops.dropmuon._muon_update_capturable_.default, args, rest)
