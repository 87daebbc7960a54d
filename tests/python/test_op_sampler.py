"""torch.ops.dropmuon.sampler_distribution and sample_layers (CPU): opcheck, the frequencies
of the cutoffs against the distribution, known distributions, draws as a function of (seed, step)
equal to the pure-PyTorch reference's, Philox4x32-10's known answers, bad input.
"""

import math

import pytest
import torch
from op_cases import requires_extension

import dropmuon
from dropmuon import defaults, ops, reference

pytestmark = requires_extension


# --------------------------------------------------------------------------------------------
# opcheck: schema, fake implementations, autograd registration, aot dispatch
# --------------------------------------------------------------------------------------------


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
# Frequencies, values, determinism, bad input
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


@pytest.mark.parametrize("num_layers", [1, 2, 7])
@pytest.mark.parametrize("strength", [4.0, 800.0, 6e199])
@pytest.mark.parametrize("progress", [0.0, 0.5, 0.8, 1.0])
def test_epoch_shift_steep_tilts_match_reference(num_layers, strength, progress):
    # exp(tilt x) is taken relative to the largest weight: a steep tilt on one layer once
    # underflowed to 0 / 0 (found by the fuzzer); the float64 reference agrees everywhere.
    got = dropmuon.sampler_distribution(
        num_layers, "epoch_shift", progress=progress, shift_strength=strength
    )
    args = ops.sampler_arguments("epoch_shift", None, None, progress, strength, None)
    want = reference.sampler_distribution(num_layers, *args)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert abs(float(got.sum()) - 1.0) < 1e-12


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
