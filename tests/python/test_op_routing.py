"""The Python side of the operators (dropmuon.ops): the forms ns_schedule accepts, and the
fallback to the pure-PyTorch references (one warning) when the extension is missing.
"""

import pytest
import torch
from op_cases import requires_extension

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
    assert pe.steps == 7 and pe.coefficients[-3:] == ops.POLAR_EXPRESS_COEFFICIENTS[-1]
    assert (pe.norm_scale, pe.norm_offset) == (1.02, 1e-6)
    custom = ops.ns_schedule([(1.5, -0.5, 0.0), (2.0, -1.0, 0.0)], None)
    assert custom.steps == 2
    for bad in ["cubic", [(1.0, 2.0)], [(1.0, 2.0, float("nan"))]]:
        with pytest.raises(ValueError):
            ops.ns_schedule(bad, None)
    with pytest.raises(ValueError, match="does not match"):
        ops.ns_schedule([(1.5, -0.5, 0.0)] * 2, 3)
