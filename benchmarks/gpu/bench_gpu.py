"""GPU benchmarks of dropmuon's CUDA kernels (run by benchmarks/gpu/run.sh on an H100/H200).

1. The measured bf16 matmul peak: an 8192^3 product through torch, the ceiling for (2).
2. Newton-Schulz, 5 Muon steps with bfloat16 iterates (what torch.optim.Muon does): dropmuon's
   spectral sharp operator (one call for the whole batch) vs torch.optim.Muon's
   _zeropower_via_newtonschulz (one call per matrix), for the paper CNN's layer shapes (one
   matrix and a batch of 16) and 1024x1024, 4096x4096, 4096x16384. Achieved TFLOP/s count
   5 (4 m^2 n + 2 m^3) per m x n matrix (m <= n), against the measured peak. Variants of ours:
   the other product route (cuBLAS for the CNN shapes, the batched kernel being the default;
   the symmetric 2x2 split off for the large ones), and CUDA-graph replays for the small shapes
   (torch's too), where launches dominate.
3. One optimizer step (gradients given) on dropmuon.compare.models.PaperCNN and ResNet18 (width 64):
   torch.optim.Muon on the weights (conv kernels as out x in*kh*kw) + AdamW on the rest, vs
   dropmuon.Muon and DropMuon (uniform sampling) with the same AdamW fallback, DropMuon with its
   default sign fallback, and a captured dropmuon Muon step (_muon_update_capturable_, graph
   replay; sign fallback).

Timing: CUDA events around each call, after warm-ups, median of several runs (and the
interquartile range); inputs rotate among several sets where they would fit in L2.

    python benchmarks/gpu/bench_gpu.py --out DIR   # writes DIR/bench.md and DIR/bench.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from contextlib import contextmanager

import torch
from captured_step import CapturedStep  # this script's folder: benchmarks/gpu/captured_step.py
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz

import dropmuon
from dropmuon import ops
from dropmuon.compare.models import PaperCNN, ResNet18

MUON = list(ops.MUON_COEFFICIENTS) * 5
CNN_SHAPES = [(64, 9), (128, 576), (256, 1152), (10, 2304)]
LARGE_SHAPES = [(1024, 1024), (4096, 4096), (4096, 16384)]
L2_BYTES = 60 * 2**20  # rotate inputs below this (H100: 50 MB, H200: 60 MB)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def time_cuda(fn, warmup=3, repeats=15, min_seconds=0.3, max_repeats=200, before=None):
    """Median and interquartile range (ms) of fn between two CUDA events; `before` runs
    untimed before each call (e.g. to set gradients)."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    torch.cuda.synchronize()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (
        time.perf_counter() - start < min_seconds and len(times) < max_repeats
    ):
        if before:
            before()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def capture_graph(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@contextmanager
def environment(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------------------------
# 1. bf16 matmul peak
# --------------------------------------------------------------------------------------------


def matmul_peak(n=8192):
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    ms, iqr = time_cuda(lambda: torch.mm(a, b, out=c), warmup=5, repeats=20)
    return 2 * n**3 / (ms * 1e-3) / 1e12, ms, iqr


# --------------------------------------------------------------------------------------------
# 2. Newton-Schulz
# --------------------------------------------------------------------------------------------


def ns_flops(rows, cols, batch):
    m, n = min(rows, cols), max(rows, cols)
    return batch * 5 * (4 * m * m * n + 2 * m**3)


def ours(x):
    return torch.ops.dropmuon.sharp(x, "spectral", MUON, 1.0, 0.0, 1e-7, "bfloat16", False)[0]


def torch_ns(x):
    return [_zeropower_via_newtonschulz(m, ops.MUON_COEFFICIENTS, 5, 1e-7) for m in x]


def bench_newton_schulz(rows, cols, batch, peak, graphs):
    nbytes = batch * rows * cols * 2
    sets = max(1, min(4, L2_BYTES // max(nbytes, 1)))
    inputs = [torch.randn(batch, rows, cols, device="cuda").bfloat16() for _ in range(sets)]
    turn = [0]

    def rotating(fn):
        def run():
            turn[0] = (turn[0] + 1) % sets
            return fn(inputs[turn[0]])

        return run

    row = dict(shape=f"{rows}x{cols}", batch=batch, flops=ns_flops(rows, cols, batch))
    row["torch_ms"], row["torch_iqr"] = time_cuda(rotating(torch_ns))
    row["ours_ms"], row["ours_iqr"] = time_cuda(rotating(ours))
    large = min(rows, cols) >= 1024
    # the other route: cuBLAS instead of the batched kernel, or no symmetric split
    knob = {"DROPMUON_CUDA_SYMMETRIC_MIN_P": 0} if large else {"DROPMUON_CUDA_BATCHED_MAX_P": 0}
    with environment(**knob):
        row["other_ms"], row["other_iqr"] = time_cuda(rotating(ours))
    row["other"] = "no split" if large else "cuBLAS"
    if graphs and not large:
        x = inputs[0]
        graph = capture_graph(lambda: ours(x))
        row["ours_graph_ms"], _ = time_cuda(graph.replay)
        graph = capture_graph(lambda: torch_ns(x))
        row["torch_graph_ms"], _ = time_cuda(graph.replay)
    row["ours_tflops"] = row["flops"] / (row["ours_ms"] * 1e-3) / 1e12
    row["torch_tflops"] = row["flops"] / (row["torch_ms"] * 1e-3) / 1e12
    row["ours_peak_pct"] = 100 * row["ours_tflops"] / peak
    # accuracy against the float64 polar iteration (same polynomial), first matrix
    x = inputs[0][:1]
    exact = dropmuon.reference.newton_schulz(x.double(), MUON, 1.0, 0.0, 1e-7)

    def error(y):
        return (
            torch.linalg.norm((y.double() - exact).flatten()) / torch.linalg.norm(exact.flatten())
        ).item()

    row["ours_error"], row["torch_error"] = error(ours(x)), error(torch_ns(x)[0][None])
    return row


# --------------------------------------------------------------------------------------------
# 3. Optimizer steps
# --------------------------------------------------------------------------------------------


def build(name):
    torch.manual_seed(0)
    if name == "PaperCNN":
        return PaperCNN(1, 10, 28).cuda()
    return ResNet18(1, 10, width=64).cuda()


def full_gradients(model, batch=256):
    x = torch.randn(batch, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}, (x, y)


def is_matrix_param(name, p):
    return p.dim() >= 2


def bench_optimizer(model_name, lr=0.02, adamw_lr=1e-3, weight_decay=0.0):
    base = build(model_name)
    grads, (x, y) = full_gradients(base)
    rows = []

    def ours(label, **options):
        model = copy.deepcopy(base)
        named = dict(model.named_parameters())
        optimizer = options.pop("cls")(model, lr=lr, weight_decay=weight_decay, **options)
        nn.functional.cross_entropy(model(x), y).backward()  # the first forward orders the layers

        def set_grads():  # what a truncated backward leaves: no gradient below the cutoff
            for name, p in named.items():
                p.grad = grads[name] if optimizer.is_active(p) else None

        ms, iqr = time_cuda(optimizer.step, warmup=5, repeats=20, before=set_grads)
        rows.append(dict(model=model_name, optimizer=label, step_ms=ms, iqr=iqr))
        return model, optimizer, set_grads

    # torch.optim.Muon on 2-D copies of the weights (same shapes as the flattened kernels) + AdamW
    model = copy.deepcopy(base)
    matrices, rest, pairs = [], [], []
    for name, p in model.named_parameters():
        if is_matrix_param(name, p):
            q = nn.Parameter(p.detach().reshape(p.shape[0], -1).clone())
            matrices.append(q)
            pairs.append((q, grads[name].reshape(q.shape)))
        else:
            rest.append(p)
            pairs.append((p, grads[name]))
    muon = torch.optim.Muon(
        matrices, lr=lr, weight_decay=weight_decay, momentum=0.95, nesterov=True
    )
    adamw = torch.optim.AdamW(rest, lr=adamw_lr, weight_decay=weight_decay)

    def torch_step():
        muon.step()
        adamw.step()

    def set_torch_grads():
        for p, g in pairs:
            p.grad = g

    ms, iqr = time_cuda(torch_step, warmup=5, repeats=20, before=set_torch_grads)
    rows.append(dict(model=model_name, optimizer="torch.optim.Muon + AdamW", step_ms=ms, iqr=iqr))

    # The custom kernels are opt-in until validated: these rows ask for them, and one row shows
    # the pure-PyTorch reference path that CUDA users get by default today.
    common = dict(momentum=0.95, nesterov=True, cuda_kernels=True)
    ours(
        "dropmuon.Muon (AdamW fallback)",
        cls=dropmuon.Muon,
        fallback="adamw",
        adamw_lr=adamw_lr,
        **common,
    )
    ours(
        "dropmuon.Muon (AdamW fallback), reference path (the default until validated)",
        cls=dropmuon.Muon,
        fallback="adamw",
        adamw_lr=adamw_lr,
        **dict(common, cuda_kernels=False),
    )
    ours(
        "DropMuon uniform (AdamW fallback)",
        cls=dropmuon.DropMuon,
        sampling="uniform",
        fallback="adamw",
        adamw_lr=adamw_lr,
        **common,
    )
    ours("DropMuon uniform (sign fallback)", cls=dropmuon.DropMuon, sampling="uniform", **common)
    # a captured Muon step (sign fallback): graph replays
    model, optimizer, set_grads = ours("dropmuon.Muon (sign fallback)", cls=dropmuon.Muon, **common)
    set_grads()
    step = CapturedStep(optimizer)
    graph = capture_graph(step)
    ms, iqr = time_cuda(graph.replay, warmup=5, repeats=20)
    rows.append(
        dict(
            model=model_name,
            optimizer="dropmuon.Muon (sign fallback), CUDA graph",
            step_ms=ms,
            iqr=iqr,
        )
    )
    reference = rows[0]["step_ms"]
    for row in rows:
        row["vs_torch"] = reference / row["step_ms"]
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def markdown(results):
    peak = results["peak"]
    lines = [
        f"## dropmuon GPU benchmarks on {results['device']}",
        "",
        f"torch {results['torch']}, CUDA {results['cuda']}. Medians of CUDA-event timings after "
        "warm-ups (± interquartile range).",
        "",
        f"Measured bf16 matmul peak (8192^3 through torch): **{peak['tflops']:.0f} TFLOP/s** "
        f"({peak['ms']:.3f} ms).",
        "",
        "### Newton-Schulz (5 Muon steps, bfloat16 iterates)",
        "",
        "TFLOP/s count 5 (4 m^2 n + 2 m^3) per matrix; 'other route' is cuBLAS for the small "
        "shapes (ours uses the batched kernel there) and no symmetric split for the large ones. "
        "Error: relative Frobenius distance to float64 Newton-Schulz.",
        "",
        "| shape | batch | torch.optim.Muon ms | dropmuon ms | speed-up | dropmuon TFLOP/s "
        "| % of peak | other route ms | graph: torch / ours ms | error torch / ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["newton_schulz"]:
        graph = (
            f"{r['torch_graph_ms']:.3f} / {r['ours_graph_ms']:.3f}" if "ours_graph_ms" in r else "-"
        )
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['torch_ms']:.3f} ± {r['torch_iqr']:.3f} "
            f"| {r['ours_ms']:.3f} ± {r['ours_iqr']:.3f} | {r['torch_ms'] / r['ours_ms']:.2f}x "
            f"| {r['ours_tflops']:.1f} | {r['ours_peak_pct']:.1f} "
            f"| {r['other_ms']:.3f} ({r['other']}) | {graph} "
            f"| {r['torch_error']:.1e} / {r['ours_error']:.1e} |"
        )
    lines += [
        "",
        "### One optimizer step (gradients given)",
        "",
        "| model | optimizer | step ms | vs torch.optim.Muon + AdamW |",
        "|---|---|---:|---:|",
    ]
    for r in results["optimizer"]:
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['step_ms']:.3f} ± {r['iqr']:.3f} "
            f"| {r['vs_torch']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/gpu/results")
    parser.add_argument("--quick", action="store_true", help="skip the largest shape")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    if not ops.has_kernel("cuda"):
        raise SystemExit("the dropmuon extension has no CUDA kernels: build it with nvcc first")
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    tflops, ms, _ = matmul_peak()
    results = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        peak=dict(tflops=tflops, ms=ms),
        newton_schulz=[],
        optimizer=[],
    )
    print(f"bf16 peak {tflops:.0f} TFLOP/s", flush=True)
    for batch in (1, 16):
        for rows, cols in CNN_SHAPES:
            results["newton_schulz"].append(bench_newton_schulz(rows, cols, batch, tflops, True))
            print(results["newton_schulz"][-1], flush=True)
    for rows, cols in LARGE_SHAPES[: 2 if args.quick else 3]:
        results["newton_schulz"].append(bench_newton_schulz(rows, cols, 1, tflops, False))
        print(results["newton_schulz"][-1], flush=True)
    for model in ("PaperCNN", "ResNet18"):
        results["optimizer"] += bench_optimizer(model)
        print(results["optimizer"][-6:], flush=True)
    report = markdown(results)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(report)


if __name__ == "__main__":
    main()
