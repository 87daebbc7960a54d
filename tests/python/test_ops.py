"""The torch operators: opcheck, equality with the pure-PyTorch references, error messages."""

import math

import pytest
import torch

import dropmuon
from dropmuon import defaults, ops, reference

pytestmark = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason="extension not built")

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
SHAPES = [(1, 1), (1, 7), (7, 64), (64, 7), (64, 64), (3, 4097), (33, 96)]
NORMS = ["spectral", "sign", "column", "row", "frobenius"]
MUON = list(ops.MUON_COEFFICIENTS) * 5


def shape_id(shape):
    return "x".join(map(str, shape))


def sharp_args(x, norm="spectral", schedule=None, ns_precision="native"):
    schedule = schedule or ops.ns_schedule("muon", 5)
    coefficients = list(schedule.coefficients)
    return (x, norm, coefficients, schedule.norm_scale, schedule.norm_offset, 1e-7, ns_precision)


# --------------------------------------------------------------------------------------------
# opcheck: schema, fake implementations, autograd registration, aot dispatch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_opcheck_sharp(norm, dtype):
    x = torch.randn(2, 7, 12, dtype=DTYPES[dtype])
    torch.library.opcheck(torch.ops.dropmuon.sharp.default, sharp_args(x, norm))


def test_opcheck_sharp_bfloat16_iterates():
    x = torch.randn(2, 12, 7)
    args = sharp_args(x, ns_precision="bfloat16")
    torch.library.opcheck(torch.ops.dropmuon.sharp.default, args)


@pytest.mark.parametrize("radius", ["fixed", "adaptive"])
def test_opcheck_muon_update(radius):
    params = [torch.randn(6, 10) for _ in range(3)]
    grads = [torch.randn(6, 10) for _ in range(3)]
    bufs = [torch.randn(6, 10) for _ in range(3)]
    kwargs = dict(
        lr=0.02,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        norm="spectral",
        ns_coefficients=MUON,
        norm_scale=1.0,
        norm_offset=0.0,
        eps=1e-7,
        ns_precision="native",
        adjust_lr_fn="original",
        radius=radius,
        L0=1.0,
        L1=0.5,
    )
    torch.library.opcheck(torch.ops.dropmuon.muon_update_.default, (params, grads, bufs), kwargs)


@pytest.mark.parametrize("kind", defaults.SAMPLINGS)
def test_opcheck_sampler(kind):
    args = (
        5,
        *ops.sampler_arguments(
            kind, [0.1, 0.2, 0.3, 0.2, 0.2], 2, 0.3, 4.0, [1.0, 3.0, 2.0, 5.0, 4.0]
        ),
    )
    torch.library.opcheck(torch.ops.dropmuon.sampler_distribution.default, args)
    torch.library.opcheck(torch.ops.dropmuon.sample_layers.default, (args[0], 7, 11, *args[1:]))


# --------------------------------------------------------------------------------------------
# Operators equal their references
# --------------------------------------------------------------------------------------------


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


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
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
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


def test_sharp_zero_and_nonfinite():
    out, duals = dropmuon.sharp(torch.zeros(2, 5, 9))
    assert torch.equal(out, torch.zeros(2, 5, 9)) and torch.equal(duals, torch.zeros(2).double())
    x = torch.randn(2, 5, 9)
    x[1, 2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="DM_ERR_NONFINITE"):
        torch.ops.dropmuon.sharp(*sharp_args(x))


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


@pytest.mark.parametrize("shape", [(7, 64), (64, 7), (16, 3, 3, 3), (10,), ()], ids=str)
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


def test_duals_are_optional():
    x = torch.randn(2, 6, 9)
    out, duals = torch.ops.dropmuon.sharp(*sharp_args(x), with_duals=False)
    full, full_duals = torch.ops.dropmuon.sharp(*sharp_args(x))
    assert duals.shape == (0,) and full_duals.shape == (2,) and torch.equal(out, full)
    params, grads, bufs = ([torch.randn(5, 8)] for _ in range(3))
    kwargs = update_kwargs(with_duals=False)
    assert torch.ops.dropmuon.muon_update_(params, grads, bufs, **kwargs).shape == (0,)
    torch.library.opcheck(torch.ops.dropmuon.sharp.default, sharp_args(x), {"with_duals": False})


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
# Sampler
# --------------------------------------------------------------------------------------------

SAMPLER_CASES = {
    "full": dict(),
    "uniform": dict(),
    "custom": dict(probabilities=[0.1, 0.4, 0.0, 0.3, 0.2]),
    "tau_nice": dict(tau=2),
    "epoch_shift": dict(progress=0.2),
    "cost_optimal": dict(smoothness=[1.0, 3.0, 2.0, 6.0, 4.0]),
}


def chi_square_p_value(counts, probabilities):
    """P-value of Pearson's chi-square test, over the cells with positive probability."""
    n = counts.sum()
    keep = probabilities > 0
    expected = n * probabilities[keep]
    statistic = (((counts[keep] - expected) ** 2) / expected).sum()
    df = int(keep.sum()) - 1
    if df == 0:
        return 1.0 if counts[~keep].sum() == 0 else 0.0
    return torch.special.gammaincc(torch.tensor(df / 2.0), statistic / 2.0).item()


@pytest.mark.parametrize("kind", list(SAMPLER_CASES))
def test_sampler_frequencies_match_distribution(kind):
    layers, draws = 5, 20000
    options = SAMPLER_CASES[kind]
    p = dropmuon.sampler_distribution(layers, kind, **options)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    counts = torch.zeros(layers, dtype=torch.float64)
    for step in range(draws):
        mask = dropmuon.sample_layers(layers, 1234, step, kind, **options)
        counts[int(mask.nonzero()[0])] += 1
        if kind == "tau_nice":
            assert int(mask.sum()) == 2
        else:
            assert torch.equal(mask, torch.arange(layers) >= int(mask.nonzero()[0]))
    assert counts[p == 0].sum() == 0, f"cutoffs drawn where p = 0: {counts}"
    assert chi_square_p_value(counts, p) > 1e-3, f"counts {counts} vs p {p}"


def test_sampler_distribution_values():
    torch.testing.assert_close(
        dropmuon.sampler_distribution(4, "tau_nice", tau=2),
        torch.tensor([3, 2, 1, 0], dtype=torch.float64) / 6,
    )
    torch.testing.assert_close(
        dropmuon.sampler_distribution(4, "cost_optimal", smoothness=[2.0, 1.0, 4.0, 3.0]),
        torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=torch.float64),
    )
    at_start = dropmuon.sampler_distribution(3, "epoch_shift", progress=0.0, shift_strength=4.0)
    w = torch.tensor([1.0, math.exp(-2.0), math.exp(-4.0)], dtype=torch.float64)
    torch.testing.assert_close(at_start, w / w.sum())
    torch.testing.assert_close(
        dropmuon.sampler_distribution(3, "epoch_shift", progress=1.0), (w / w.sum()).flip(0)
    )


@pytest.mark.parametrize("kind", list(SAMPLER_CASES))
def test_sampler_is_a_function_of_seed_and_step(kind):
    options = SAMPLER_CASES[kind]
    first = [dropmuon.sample_layers(5, 99, s, kind, **options) for s in range(200)]
    again = [dropmuon.sample_layers(5, 99, s, kind, **options) for s in reversed(range(200))]
    assert all(torch.equal(a, b) for a, b in zip(first, reversed(again)))
    # The pure-Python reference draws the very same layers (Philox4x32-10 on both sides).
    args = ops.sampler_arguments(
        kind,
        options.get("probabilities"),
        options.get("tau"),
        options.get("progress", 0.0),
        4.0,
        options.get("smoothness"),
    )
    for s in range(200):
        assert torch.equal(first[s], reference.sample_layers(5, 99, s, *args))
    if kind != "full":
        other = [dropmuon.sample_layers(5, 100, s, kind, **options) for s in range(200)]
        assert any(not torch.equal(a, b) for a, b in zip(first, other))


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32_10.
    assert reference.philox4x32_10((0, 0, 0, 0), (0, 0)) == [
        0x6627E8D5,
        0xE169C58D,
        0xBC57AC4C,
        0x9B00DBD8,
    ]
    assert reference.philox4x32_10(
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)
    ) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize(
    "kind, options, message",
    [
        ("custom", dict(probabilities=[0.5, 0.6, -0.1]), "DM_ERR_PROBABILITY"),
        ("custom", dict(probabilities=[0.5, 0.4, 0.0]), "DM_ERR_PROBABILITY"),
        ("custom", dict(probabilities=[float("nan"), 0.5, 0.5]), "DM_ERR_PROBABILITY"),
        ("custom", dict(probabilities=[0.5, 0.5]), "one probability per layer"),
        ("tau_nice", dict(tau=4), "DM_ERR_INVALID_ARG"),
        ("epoch_shift", dict(progress=1.5), "DM_ERR_INVALID_ARG"),
        ("cost_optimal", dict(smoothness=[0.0, 0.0, 0.0]), "DM_ERR_INVALID_ARG"),
        ("bogus", dict(), "unknown sampling"),
    ],
)
def test_sampler_rejects_bad_input(kind, options, message):
    with pytest.raises(RuntimeError, match=message):
        dropmuon.sample_layers(3, 0, 0, kind, **options)


# --------------------------------------------------------------------------------------------
# Fallback when the extension is missing
# --------------------------------------------------------------------------------------------


def test_fallback_warns_once_and_matches(monkeypatch):
    x = torch.randn(2, 6, 9)
    expected = dropmuon.sharp(x)
    expected_mask = dropmuon.sample_layers(7, 3, 5, "uniform")
    monkeypatch.setattr(ops, "EXTENSION_ERROR", ImportError("simulated"))
    monkeypatch.setattr(ops, "_warned", set())
    with pytest.warns(UserWarning, match="pure-PyTorch reference") as record:
        got = dropmuon.sharp(x)
        dropmuon.sharp(x)
        mask = dropmuon.sample_layers(7, 3, 5, "uniform")
    assert len(record) == 1
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(mask, expected_mask)


def test_ns_schedule_forms():
    assert ops.ns_schedule("muon", 5).coefficients == ops.MUON_COEFFICIENTS * 5
    pe = ops.ns_schedule("polar_express", 7)
    assert pe.steps == 7 and pe.coefficients[-3:] == ops.POLAR_EXPRESS_COEFFICIENTS[-1]
    assert (pe.norm_scale, pe.norm_offset) == (1.02, 1e-6)
    custom = ops.ns_schedule([(1.5, -0.5, 0.0), (2.0, -1.0, 0.0)], None)
    assert custom.steps == 2
    for bad in ["cubic", [(1.0, 2.0)], [(1.0, 2.0, float("nan"))]]:
        with pytest.raises(ValueError):
            ops.ns_schedule(bad, None)
    with pytest.raises(ValueError, match="does not match"):
        ops.ns_schedule([(1.5, -0.5, 0.0)] * 2, 3)
