"""The Python side of the operators (dropmuon.ops): the forms ns_schedule accepts, the
fallback to the pure-PyTorch references (one warning) when the extension is missing, and the
choice of path for CUDA tensors (the custom kernels are opt-in until they have passed on real
hardware): tested on the CPU by pretending the extension has CUDA kernels.
"""

import warnings

import pytest
import torch
from op_cases import requires_extension
from torch import nn

import dropmuon
from dropmuon import ops

pytestmark = requires_extension


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
    assert pe.steps == 7 and pe.coefficients[-3:] == dropmuon.POLAR_EXPRESS_COEFFICIENTS[-1]
    assert (pe.norm_scale, pe.norm_offset) == (1.02, 1e-6)
    custom = ops.ns_schedule([(1.5, -0.5, 0.0), (2.0, -1.0, 0.0)], None)
    assert custom.steps == 2
    for bad in ["cubic", [(1.0, 2.0)], [(1.0, 2.0, float("nan"))]]:
        with pytest.raises(ValueError):
            ops.ns_schedule(bad, None)
    with pytest.raises(ValueError, match="does not match"):
        ops.ns_schedule([(1.5, -0.5, 0.0)] * 2, 3)


@pytest.fixture
def cuda_build(monkeypatch):
    """An extension that has CUDA kernels (as a CUDA build would), no opt-in variable set, and
    no notice given yet."""
    monkeypatch.setattr(ops, "has_kernel", lambda device_type: device_type in ("cpu", "cuda"))
    monkeypatch.delenv(ops.CUDA_KERNELS_ENV, raising=False)
    monkeypatch.setattr(ops, "_warned", set())
    return monkeypatch


def test_cuda_tensors_take_the_reference_by_default_with_one_notice(cuda_build):
    with pytest.warns(UserWarning, match="opt-in until they have passed on real hardware") as w:
        assert ops.use_kernel("cuda") is False
        assert ops.use_kernel("cuda") is False
    assert len(w) == 1 and "DROPMUON_CUDA_KERNELS=1" in str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU kernels are no opt-in: no notice
        assert ops.use_kernel("cpu") is True


@pytest.mark.parametrize(
    "env, option, expected",
    [
        ("1", None, True),
        ("0", None, False),
        ("", None, False),
        ("0", True, True),  # the optimizer option wins over the variable
        ("1", False, False),
    ],
)
def test_cuda_kernels_opt_in(cuda_build, env, option, expected):
    cuda_build.setenv(ops.CUDA_KERNELS_ENV, env)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ops.use_kernel("cuda", option) is expected
    assert ops.cuda_kernels_enabled(option) is expected


def test_the_default_is_the_validation_flag(cuda_build):
    """Flipping CUDA_KERNELS_VALIDATED (in the commit that records a passing GPU run) is all it
    takes to make the kernels the default."""
    assert ops.cuda_kernels_enabled() is ops.CUDA_KERNELS_VALIDATED
    cuda_build.setattr(ops, "CUDA_KERNELS_VALIDATED", True)
    assert ops.cuda_kernels_enabled() is True and ops.use_kernel("cuda") is True


def test_a_bad_opt_in_value_is_refused(cuda_build):
    cuda_build.setenv(ops.CUDA_KERNELS_ENV, "yes")
    with pytest.raises(ValueError, match="DROPMUON_CUDA_KERNELS must be 0 or 1, got 'yes'"):
        ops.use_kernel("cuda")
    with pytest.raises(ValueError, match="cuda_kernels must be None, True or False"):
        dropmuon.DropMuon(nn.Linear(3, 2), cuda_kernels="yes")


@pytest.mark.parametrize("option", [None, True, False])
def test_the_optimizer_passes_its_choice_to_every_kernel_call(monkeypatch, option):
    """DropMuon(cuda_kernels=...) reaches the update and the smoothness estimator's sharp."""
    seen = []
    update, sharp = ops.muon_update_, ops.sharp

    def recording_update(*args, cuda_kernels=None, **kwargs):
        seen.append(("muon_update_", cuda_kernels))
        return update(*args, cuda_kernels=cuda_kernels, **kwargs)

    def recording_sharp(*args, cuda_kernels=None, **kwargs):
        seen.append(("sharp", cuda_kernels))
        return sharp(*args, cuda_kernels=cuda_kernels, **kwargs)

    monkeypatch.setattr(ops, "muon_update_", recording_update)
    monkeypatch.setattr(ops, "sharp", recording_sharp)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = dropmuon.DropMuon(
        model,
        lr=0.02,
        sampling="full",
        estimate_smoothness=True,
        smoothness_every=1,
        cuda_kernels=option,
    )
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
    assert {name for name, _ in seen} == {"muon_update_", "sharp"}
    assert all(choice is option for _, choice in seen), seen
