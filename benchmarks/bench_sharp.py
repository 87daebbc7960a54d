"""Spectral sharp operator (Newton-Schulz, 5 Muon steps) on the CPU: ours vs the pure-PyTorch
reference vs torch.optim.Muon's own Newton-Schulz vs the raw matrix products alone.

Every timing is the median of --repeats runs after a warm-up, all in this one process, the
three contenders of a row timed in turn within each round, so the ratios compare like with like.
Two precisions, each against its own limit:
  - float32 iterates: ours (ns_precision="native") vs dropmuon.reference.newton_schulz in float32;
  - bfloat16 iterates: ours (ns_precision="bfloat16") vs torch.optim.Muon's
    _zeropower_via_newtonschulz (which always iterates in bfloat16).
The raw-product limit runs the same 15 GEMMs (X X^T, A A, P X per step) into preallocated
outputs with nothing else. Accuracy is the relative Frobenius distance to the exact polar factor
U V^T (float64 SVD) of the same Gaussian matrix; the last column is our operator with the Polar
Express schedule (5 steps, same cost) instead of Muon's.

    python benchmarks/bench_sharp.py [--repeats 7] [--threads 2] [--output table.md]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_muon_newton_schulz

import dropmuon
from dropmuon import ops, reference

SHAPES = [(64, 576), (128, 1152), (256, 2304), (512, 512), (1024, 1024), (2048, 2048)]
STEPS = 5


def median_seconds(fns: list, repeats: int) -> list[float]:
    """Median time of each function, timed round-robin (one run of each per round) so that a
    slow spell of the machine falls on all of them alike instead of on one."""
    for fn in fns:
        fn()  # warm-up: allocator, BLAS packing buffers, thread pool
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def raw_products(m: int, n: int, dtype: torch.dtype):
    """The 15 GEMMs of 5 Newton-Schulz steps and nothing else: the time limit."""
    x = torch.randn(m, n, dtype=dtype) / n**0.5
    gram, poly, out = (
        torch.empty(m, m, dtype=dtype),
        torch.empty(m, m, dtype=dtype),
        torch.empty(m, n, dtype=dtype),
    )

    def run():
        for _ in range(STEPS):
            torch.mm(x, x.T, out=gram)
            torch.mm(gram, gram, out=poly)
            torch.mm(poly, x, out=out)

    return run


def relative_error(result: torch.Tensor, target: torch.Tensor) -> float:
    diff = torch.linalg.matrix_norm(result.double() - target)
    return (diff / torch.linalg.matrix_norm(target)).item()


def bench_shape(m: int, n: int, repeats: int) -> list[dict]:
    x = torch.randn(m, n)
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    polar = u @ vh
    coefficients = list(ops.MUON_COEFFICIENTS) * STEPS
    batch = x.unsqueeze(0)
    # Polar Express (5 steps, its own normalisation) for the accuracy column only: same cost.
    pe = ops.ns_schedule("polar_express", STEPS)
    rows = []
    for precision in ("float32", "bfloat16"):
        ns_precision = "native" if precision == "float32" else "bfloat16"

        def ours(ns_precision=ns_precision):
            return torch.ops.dropmuon.sharp(  # no duals: the baselines compute none
                batch, "spectral", coefficients, 1.0, 0.0, 1e-7, ns_precision, False
            )[0][0]

        if precision == "float32":
            name = "reference (fp32)"

            def baseline():
                return reference.newton_schulz(batch, coefficients, 1.0, 0.0, 1e-7)[0]
        else:
            name = "torch.optim.Muon (bf16)"

            def baseline():
                return torch_muon_newton_schulz(x, ops.MUON_COEFFICIENTS, STEPS, 1e-7)

        def polar_express(ns_precision=ns_precision):
            return torch.ops.dropmuon.sharp(
                batch,
                "spectral",
                list(pe.coefficients),
                pe.norm_scale,
                pe.norm_offset,
                1e-7,
                ns_precision,
                False,
            )[0][0]

        dtype = torch.float32 if precision == "float32" else torch.bfloat16
        t_ours, t_base, t_raw = median_seconds([ours, baseline, raw_products(m, n, dtype)], repeats)
        rows.append(
            dict(
                shape=f"{m}x{n}",
                precision=precision,
                baseline=name,
                ours_ms=t_ours * 1e3,
                baseline_ms=t_base * 1e3,
                raw_ms=t_raw * 1e3,
                err_ours=relative_error(ours(), polar),
                err_base=relative_error(baseline(), polar),
                err_pe=relative_error(polar_express(), polar),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shapes", nargs="*", default=None, help="e.g. 64x576 1024x1024")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes]

    lines = [
        f"torch {torch.__version__}, dropmuon {dropmuon.__version__}, {args.threads} threads, "
        f"median of {args.repeats}; error = ||O - UV^T||_F / ||UV^T||_F",
        "",
        "| shape | iterates | ours ms | baseline | baseline ms | raw GEMMs ms "
        "| ours/raw | ours/baseline | error ours | error baseline | error ours, Polar Express |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for m, n in shapes:
        for r in bench_shape(m, n, args.repeats):
            line = (
                f"| {r['shape']} | {r['precision']} | {r['ours_ms']:.2f} | {r['baseline']} "
                f"| {r['baseline_ms']:.2f} | {r['raw_ms']:.2f} "
                f"| {r['ours_ms'] / r['raw_ms']:.2f} | {r['ours_ms'] / r['baseline_ms']:.2f} "
                f"| {r['err_ours']:.4f} | {r['err_base']:.4f} | {r['err_pe']:.4f} |"
            )
            print(line, flush=True)
            lines.append(line)
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
