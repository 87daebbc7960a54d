"""torch.compile: a compiled model trained by DropMuon (graphs per active set, no graph breaks,
the eager trajectory), and the operators under fullgraph=True.

Recompilations are counted with torch's own test backend counter on "aot_eager": the same
Dynamo guards and AOTAutograd graphs as inductor, without its code generation (seconds per
graph on this machine); one operator test runs inductor itself."""

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import dropmuon
from dropmuon import ops


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def mlp(layers=4, width=16):
    torch.manual_seed(0)
    blocks = [nn.Linear(8, width), nn.Tanh()]
    for _ in range(layers - 2):
        blocks += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*blocks, nn.Linear(width, 4))


def train(forward, opt, steps):
    """The set of masks of the steps after the first (the first forward, which orders the
    layers, runs eagerly)."""
    masks = set()
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
        if s > 0:
            masks.add(tuple(opt.active_layers))
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
    return masks


@pytest.mark.parametrize("order", ["compile_first", "optimizer_first"])
def test_compiled_model_one_graph_per_active_set(order):
    eager = mlp()
    eager_opt = dropmuon.DropMuon(eager, lr=0.02, seed=1, ns_precision="native")
    train(eager, eager_opt, 30)

    counter = CompileCounterWithBackend("aot_eager")
    model = mlp()
    if order == "compile_first":
        compiled = torch.compile(model, backend=counter)
        opt = dropmuon.DropMuon(compiled, lr=0.02, seed=1, ns_precision="native")
    else:
        opt = dropmuon.DropMuon(model, lr=0.02, seed=1, ns_precision="native")
        compiled = torch.compile(model, backend=counter)
    masks = train(compiled, opt, 30)

    assert len(masks) == opt.num_layers == 4  # every cutoff came up
    # One graph per active set; the first forward ran eagerly (it orders the layers).
    assert counter.frame_count == len(masks) <= opt.num_layers
    assert not counters["graph_break"]
    assert all(p.requires_grad for p in model.parameters())  # the user's flags between steps
    assert opt.layer_names()[0].endswith("0")  # the trace saw the real order
    for a, b in zip(model.parameters(), eager.parameters()):
        assert torch.equal(a, b)  # and the very trajectory of the eager model


def test_compiled_model_truncates_backprop():
    """Compiled or not, the frozen layers get no gradient once the trace is done."""
    counter = CompileCounterWithBackend("aot_eager")
    model = mlp()
    opt = dropmuon.DropMuon(model, lr=0.02, seed=1, sampling=[0.0, 0.0, 1.0, 0.0])
    compiled = torch.compile(model, backend=counter)
    train(compiled, opt, 2)
    opt.zero_grad()
    compiled(torch.randn(3, 8)).sum().backward()
    grads = [p.grad is not None for p in model.parameters()]
    assert grads == [False] * 4 + [True] * 4


def test_more_layers_than_the_default_recompile_limit():
    """10 layers need up to 11 graphs, more than Dynamo's default limit of 8: raising
    recompile_limit (as the DropMuon docs say) keeps every step compiled."""
    counter = CompileCounterWithBackend("aot_eager")
    model = mlp(layers=10, width=8)
    opt = dropmuon.DropMuon(model, lr=0.02, seed=3)
    with torch._dynamo.config.patch(recompile_limit=opt.num_layers + 2):
        masks = train(torch.compile(model, backend=counter), opt, 40)
    assert len(masks) > 7  # past the default limit
    assert counter.frame_count == len(masks)


def test_compile_in_place_trains_without_truncation_and_says_so():
    """model.compile() compiles the very module call DropMuon's hooks run in: no layer is
    frozen (every gradient is computed, the frozen ones are dropped by the step), the
    trajectory is the eager one, and DropMuon warns once, naming the fix."""
    eager = mlp()
    eager_opt = dropmuon.DropMuon(eager, lr=0.02, seed=1, ns_precision="native")
    train(eager, eager_opt, 6)
    model = mlp()
    opt = dropmuon.DropMuon(model, lr=0.02, seed=1, ns_precision="native")
    model.compile(backend="aot_eager")
    with pytest.warns(dropmuon.TruncationDefeatedWarning, match="torch.compile\\(model\\)"):
        train(model, opt, 6)
    for a, b in zip(model.parameters(), eager.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# The operators under fullgraph=True
# ----------------------------------------------------------------------------------------------


def sharp_through_the_op(m):
    coefficients = list(ops.MUON_COEFFICIENTS) * 5
    out, duals = torch.ops.dropmuon.sharp(m, "spectral", coefficients, 1.0, 0.0, 1e-7, "native")
    return out * 2, duals


def test_sharp_op_fullgraph_inductor():
    m = torch.randn(2, 8, 12)
    compiled = torch.compile(sharp_through_the_op, fullgraph=True, backend="inductor")
    out, duals = compiled(m)
    expected, expected_duals = sharp_through_the_op(m)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(duals, expected_duals)


def test_muon_update_op_fullgraph_mutates_in_place():
    """The mutating op, functionalised by AOTAutograd and written back: the compiled call
    updates params and buffers in place exactly as the eager one."""

    def step(params, grads, buffers):
        torch.ops.dropmuon.muon_update_(
            params, grads, buffers, lr=0.1, weight_decay=0.1, momentum=0.9, nesterov=True,
            norm="spectral", ns_coefficients=list(ops.MUON_COEFFICIENTS) * 5, norm_scale=1.0,
            norm_offset=0.0, eps=1e-7, ns_precision="native", adjust_lr_fn="original",
            radius="fixed", L0=1.0, L1=0.0,
        )  # fmt: skip
        return params[0].sum()

    torch.manual_seed(0)
    params = [torch.randn(4, 6) for _ in range(2)]
    grads = [torch.randn(4, 6) for _ in range(2)]
    buffers = [torch.randn(4, 6) for _ in range(2)]
    eager = [[t.clone() for t in ts] for ts in (params, grads, buffers)]
    torch.compile(step, fullgraph=True, backend="aot_eager")(params, grads, buffers)
    step(*eager)
    for mine, theirs in zip(params + buffers, eager[0] + eager[2]):
        assert torch.equal(mine, theirs)
    assert not torch.equal(params[0], grads[0])


def test_ops_wrapper_fullgraph():
    m = torch.randn(2, 8, 12)
    fn = lambda x: ops.sharp(x, "spectral", ns_precision="native")[0]  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(m), fn(m))
