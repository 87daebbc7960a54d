"""CUDA graphs and the CUDA build (skipped without a GPU): the extension has CUDA kernels, sharp
captured and replayed (NaN input: NaN outputs, nothing raises), muon_update_ refusing capture,
and a whole DropMuon step captured once through _muon_update_capturable_ (benchmarks/gpu/
captured_step.py's CapturedStep) and replayed against the eager optimizer, lr changing between
replays, a NaN gradient stopping every layer.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

# CapturedStep: the capture prototype shared with the GPU benchmark, not part of the library.
from op_cases import (
    CapturedStep,
    make_lists,
    requires_cuda,
    requires_extension,
    sharp_args,
    update_kwargs,
)

from dropmuon import DropMuon, ops
from dropmuon.compare.models import PaperCNN

pytestmark = [requires_extension, requires_cuda]


def test_extension_has_cuda_kernels():
    assert ops.has_kernel("cuda"), "the extension was built without CUDA: run setup.py with nvcc"
    for op in ("sharp", "muon_update_", "_muon_update_capturable_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dropmuon::{op}", "CUDA"), op


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


def test_muon_update_refuses_capture():
    params, grads, bufs = make_lists((6, 9), torch.float32, "cuda")
    torch.ops.dropmuon.muon_update_(params, grads, bufs, **update_kwargs())  # warm-up
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="_muon_update_capturable_"):
        with torch.cuda.graph(graph):
            torch.ops.dropmuon.muon_update_(params, grads, bufs, **update_kwargs())


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
    step = CapturedStep(optimizer, active)
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
