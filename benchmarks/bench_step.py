"""Where a Drop-Muon training step's time goes, per cutoff, on the paper's CNN (CPU).

For each batch size and each cutoff s (layers s.. are updated, backprop stops at s):
  - measured forward, backward and optimizer-step times (medians of --repeats runs);
  - the cost model's prediction (docs/method.md section 1): forward unchanged; backward = the weight
    gradients of the active layers plus the input gradients of the layers above the cutoff,
    each as many FLOPs as the layer's forward; predicted backward time = measured full backward
    x (predicted backward FLOPs at s / at s = 0);
  - what DropMuon adds around a step: drawing the next layers; the process-wide forward hooks
    that freeze the layers below the cutoff for each forward pass (per module call, and a
    forward + backward of the paper CNN and of a small nn.TransformerEncoder with and without
    an optimizer alive); the diagnostics;
  - DropMuon's optimizer step next to torch.optim.Muon (+ AdamW for the biases, conv kernels
    held as 2-D weights as in dropmuon.compare.train) on the same model and gradients.

    python benchmarks/bench_step.py [--batch-sizes 1024 8192] [--repeats 5] [--output t.md]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_baselines import steps_of  # benchmarks/ is the script's folder
from torch import nn

import dropmuon
from dropmuon.compare.models import PaperCNN
from dropmuon.diagnostics import Diagnostics


class FixedCutoff:
    def __init__(self, cutoff: int) -> None:
        self.cutoff = cutoff

    def sample(self, step: int, num_layers: int) -> list[bool]:
        return [i >= self.cutoff for i in range(num_layers)]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_flops(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Forward FLOPs of the four layers (3 convs, head), from their output shapes."""
    flops = []

    def hook(module, args, out):
        if isinstance(module, nn.Conv2d):
            n, c_out, h, w = out.shape
            flops.append(2 * n * c_out * h * w * module.in_channels * 9)
        elif isinstance(module, nn.Linear):
            flops.append(2 * args[0].shape[0] * module.in_features * module.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return flops


def predicted_backward_flops(flops: list[int], cutoff: int) -> int:
    weights = sum(flops[cutoff:])
    inputs = sum(flops[cutoff + 1 :])  # the cutoff layer's input needs no gradient
    return weights + inputs


def bench_cutoffs(batch: int, repeats: int) -> list[str]:
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    model = PaperCNN()
    flops = layer_flops(model, x[:1])
    rows, full = [], None
    for cutoff in range(4):
        opt = dropmuon.DropMuon(model, lr=0.05, sampling=FixedCutoff(cutoff), fallback="adamw")
        times = {"forward": [], "backward": [], "step": []}
        for r in range(repeats + 1):  # the first round warms up
            opt.zero_grad()
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if r:
                times["forward"].append(t1 - t0)
                times["backward"].append(t2 - t1)
                times["step"].append(t3 - t2)
        med = {k: statistics.median(v) for k, v in times.items()}
        if cutoff == 0:
            full = med
        share = predicted_backward_flops(flops, cutoff) / predicted_backward_flops(flops, 0)
        predicted_backward = full["backward"] * share
        total = med["forward"] + med["backward"] + med["step"]
        full_total = full["forward"] + full["backward"] + full["step"]
        rows.append(
            f"| {batch} | {cutoff} | {med['forward']:.3f} | {med['backward']:.3f} | "
            f"{predicted_backward:.3f} | {med['backward'] / max(predicted_backward, 1e-9):.2f} | "
            f"{med['step'] * 1e3:.1f} | {total:.3f} | {total / full_total:.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


def bench_draw(repeats: int) -> tuple[float, float]:
    """(seconds to make the next step the coming one: draw its layers and tell the forward
    hooks, full training-step seconds at batch 1024) for DropMuon uniform."""
    torch.manual_seed(0)
    model = PaperCNN()
    opt = dropmuon.DropMuon(model, lr=0.05, sampling="uniform", fallback="adamw")
    x, y = torch.randn(1024, 1, 28, 28), torch.randint(0, 10, (1024,))

    def train_step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    train_step()
    step_time = median_time(train_step, repeats)
    draw_time = median_time(lambda: opt._begin_step(opt.step_count + 1), 200)
    return draw_time, step_time


class TinyTransformer(nn.Module):
    """Many small modules: 4 nn.TransformerEncoderLayer blocks of width 32 (about 40 module
    calls per forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(32, 64)

    def forward(self, tokens):
        return self.head(self.blocks(self.embed(tokens)))


def bench_forward_hooks(repeats: int) -> list[str]:
    """The forward hooks' cost: a forward + backward (no optimizer step) with no optimizer
    alive; with Muon after its first step (nothing to freeze: no hooks); with DropMuon at a
    fixed cutoff after its first step (the hooks' light pass: the outermost call only), at
    cutoff 0 (nothing frozen: the hooks alone) and 1 (the first layer frozen for the pass: the
    backward saving too); and with the hooks seeing every module call (a DropMuon whose first
    forward is still to be traced, the most they cost). Timed round-robin, medians; then the
    per-call cost of both modes on a stack of 200 tiny modules."""
    rows = []
    cases = [
        ("paper CNN, batch 256", PaperCNN, lambda: torch.randn(256, 1, 28, 28)),
        ("nn.TransformerEncoder, 4x32, batch 16x64", TinyTransformer,
         lambda: torch.randint(0, 64, (16, 64))),
    ]  # fmt: skip
    setups = {
        "no optimizer": lambda model: None,
        "Muon, after its first step": lambda model: dropmuon.Muon(model),
        "DropMuon at cutoff 0 (hooks, light pass)": lambda m: dropmuon.DropMuon(
            m, sampling=FixedCutoff(0)
        ),
        "DropMuon at cutoff 1 (layer 0 frozen)": lambda m: dropmuon.DropMuon(
            m, sampling=FixedCutoff(1)
        ),
        "hooks on every call (first forward)": lambda m: dropmuon.DropMuon(
            m, sampling=FixedCutoff(0)
        ),
    }
    for label, make, inputs in cases:
        torch.manual_seed(0)
        model, x = make(), inputs()

        def pass_(model=model, x=x):
            model.zero_grad()
            model(x).flatten(0, -2).logsumexp(-1).mean().backward()

        times = {name: [] for name in setups}
        for _ in range(repeats * 4):
            for name, setup in setups.items():
                opt = setup(model)
                if opt is not None and not name.startswith("hooks on every call"):
                    pass_()
                    opt.step()  # the first step: layers ordered, the cutoff's check done
                    pass_()
                    opt.step()
                start = time.perf_counter()
                pass_()
                times[name].append(time.perf_counter() - start)
                del opt
        base = statistics.median(times["no optimizer"])
        for name, spent in times.items():
            ms = statistics.median(spent) * 1e3
            rows.append(f"| {label} | {name} | {ms:.2f} | {ms / (base * 1e3):.3f} |")
            print(rows[-1], flush=True)
    # Per module call: 200 tiny Linear layers in a Sequential.
    stack = nn.Sequential(*[nn.Linear(4, 4) for _ in range(200)])
    x = torch.randn(1, 4)
    plain, every, light = [], [], []
    for _ in range(repeats * 4):
        plain.append(median_time(lambda: stack(x).sum().backward(), 5))
        opt = dropmuon.DropMuon(stack, sampling=FixedCutoff(0))  # first forward: every call
        every.append(median_time(lambda: stack(x).sum().backward(), 1))
        opt.step()
        stack(x).sum().backward()
        opt.step()
        light.append(median_time(lambda: stack(x).sum().backward(), 5))
        del opt
    base = statistics.median(plain)
    for name, spent in (("every call", every), ("light pass", light)):
        per_call = (statistics.median(spent) - base) / 201
        rows.append(
            f"| 200 tiny nn.Linear | hooks, {name} | {per_call * 1e6:.2f} us per call | - |"
        )
        print(rows[-1], flush=True)
    return rows


def bench_diagnostics() -> dict[str, float]:
    """Seconds per step of DropMuon's step-time checks (dropmuon.diagnostics) on the paper CNN's
    4 layers: the no-gradient check and the check that a forward went through the hooks (the
    cutoff layer's input check runs inside the hooks, in the numbers above)."""
    diagnostics = Diagnostics()
    active, with_grad = [False, False, True, True], {2, 3}
    check = median_time(lambda: diagnostics.check_gradients(active, with_grad, list, 0), 500)
    seen = median_time(lambda: diagnostics.check_forward_seen(1, True, with_grad, 0), 500)
    return {"check_gradients": check, "check_forward_seen": seen}


def bench_optimizer_steps(repeats: int) -> list[str]:
    """optimizer.step() alone, same model and gradients: dropmuon.Muon (every layer; bfloat16 and
    native Newton-Schulz iterates) vs torch.optim.Muon + AdamW, timed round-robin."""
    contenders = [
        ("muon", "bfloat16", "dropmuon.Muon (every layer), bf16 iterates"),
        ("muon", "native", "dropmuon.Muon (every layer), fp32 iterates"),
        ("torch-muon", "bfloat16", "torch.optim.Muon + AdamW (bf16 iterates)"),
    ]
    batch = (256, 1, 28, 28)
    steps = steps_of([(name, precision) for name, precision, _ in contenders], PaperCNN, batch)
    times = [[] for _ in steps]
    for _ in range(repeats * 4):
        for step, spent in zip(steps, times):
            start = time.perf_counter()
            step()
            spent.append(time.perf_counter() - start)
    rows = []
    torch_ms = statistics.median(times[-1]) * 1e3
    for (_, _, label), spent in zip(contenders, times):
        ms = statistics.median(spent) * 1e3
        rows.append(f"| {label} | {ms:.2f} | {ms / torch_ms:.2f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1024, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
        f"{args.repeats}; seconds unless marked",
        "",
        "| batch | cutoff | forward | backward | predicted backward | measured / predicted | "
        "optimizer ms | step | step / full step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for batch in args.batch_sizes:
        lines += bench_cutoffs(batch, args.repeats)
    draw, step = bench_draw(args.repeats)
    lines += [
        "",
        f"Drawing the next step's layers: {draw * 1e6:.1f} us per step = "
        f"{100 * draw / step:.3f}% of a {step:.3f} s training step (batch 1024, "
        "uniform sampling).",
        "",
        "| forward + backward | optimizer alive | ms | vs no optimizer |",
        "|---|---|---|---|",
    ]
    print("\n".join(lines[-4:]), flush=True)
    lines += bench_forward_hooks(args.repeats)
    checks = bench_diagnostics()
    total = sum(checks.values())
    lines += [
        "",
        "Diagnostics (dropmuon.diagnostics) per step: "
        + ", ".join(f"{name} {seconds * 1e6:.1f} us" for name, seconds in checks.items())
        + f"; together {100 * total / step:.4f}% of the training step above.",
    ]
    print(lines[-1], flush=True)
    lines += [
        "",
        "| optimizer.step() only, paper CNN | ms | vs torch.optim.Muon + AdamW |",
        "|---|---|---|",
    ]
    lines += bench_optimizer_steps(args.repeats)
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
