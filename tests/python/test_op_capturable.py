"""torch.ops.dropmuon._muon_update_capturable_, the experimental CUDA-graph-capturable update
(hyperparameters in a float64 device tensor, errors reported into an int32 status tensor instead
of raised), on CPU and CUDA: it equals muon_update_, reports NaN and bad hyperparameters into
the status (a nonzero status gates the update), rejects bad tensors, and passes opcheck.
"""

import pytest
import torch
from op_cases import (
    DEVICES,
    NORMS,
    UPDATE_OPTIONS,
    capturable_kwargs,
    make_lists,
    requires_extension,
    update_kwargs,
)

pytestmark = requires_extension


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


@pytest.mark.parametrize("device", DEVICES)
def test_capturable_rejects_bad_tensors(device):
    params, grads, bufs = make_lists((6, 9), torch.float32, device)
    _, rest = capturable_kwargs(update_kwargs())
    status = torch.zeros(1, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="5 values"):
        torch.ops.dropmuon._muon_update_capturable_(
            params, grads, bufs, torch.zeros(4, dtype=torch.float64, device=device), status, **rest
        )
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.dropmuon._muon_update_capturable_(
            params,
            grads,
            bufs,
            torch.zeros(5, dtype=torch.float64, device=device),
            status.float(),
            **rest,
        )


@pytest.mark.parametrize("radius", ["fixed", "adaptive"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_capturable(device, radius):
    params, grads, bufs = make_lists((6, 10), torch.float32, device)
    hyper, rest = capturable_kwargs(update_kwargs(radius=radius))
    args = (
        params,
        grads,
        bufs,
        torch.tensor(hyper, dtype=torch.float64, device=device),
        torch.zeros(1, dtype=torch.int32, device=device),
    )
    torch.library.opcheck(torch.ops.dropmuon._muon_update_capturable_.default, args, rest)
