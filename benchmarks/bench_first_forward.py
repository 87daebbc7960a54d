"""What the first forward pass after building a DropMuon costs (CPU): the pass that orders the
layers by where it first uses their parameters (a torch function mode sees every torch call,
and every module call goes through the hooks) against the same forward with no optimizer, and
against a later forward of the same optimizer (steady state).

For each model, each of --repeats rounds takes a fresh copy of the model and times, in one
process: a plain forward (median of 3, after a warm-up), then the first forward of a new
DropMuon on it (traced, step 0's layers frozen as they are reached), then one step and a later
forward. Reported: medians over rounds and the ratios side by side.

    python benchmarks/bench_first_forward.py [--repeats 7] [--output t.md]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import dropmuon
from dropmuon.compare.models import CharGPT, ResNet18, WordTransformer


def models():
    idx = torch.randint(0, 256, (16, 64))
    out = [
        ("word_language_model (4 x 128)", WordTransformer(256, 128, 4, 4, context=64), idx),
        ("harness gpt (4 x 128)", CharGPT(256, 64, dim=128, depth=4, heads=4), idx),
        ("harness resnet18 (width 16)", ResNet18(3, 10, width=16), torch.randn(32, 3, 32, 32)),
    ]
    try:
        import transformers

        config = transformers.GPT2Config(vocab_size=256, n_embd=128, n_layer=4, n_head=4)
        out.append(("HF GPT-2 (4 x 128)", transformers.GPT2LMHeadModel(config), idx))
    except ImportError:
        pass
    return out


def loss_of(model, x):
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    return out.float().square().mean()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_round(model, x):
    m = copy.deepcopy(model)
    loss_of(m, x)  # warm-up
    plain = statistics.median(timed(lambda: loss_of(m, x)) for _ in range(3))
    opt = dropmuon.DropMuon(m, lr=0.01, sampling="full")  # every layer active: same graph
    first = timed(lambda: loss_of(m, x))
    loss_of(m, x).backward()
    opt.step()
    opt.zero_grad()
    later = statistics.median(timed(lambda: loss_of(m, x)) for _ in range(3))
    del opt
    return plain, first, later


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of "
        f"{args.repeats} rounds (`python benchmarks/bench_first_forward.py "
        f"--repeats {args.repeats}`)",
        "",
        "| model | plain forward | first forward (traced) | ratio | later forward | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, model, x in models():
        rounds = [one_round(model, x) for _ in range(args.repeats)]
        plain, first, later = (statistics.median(r[i] for r in rounds) for i in range(3))
        lines.append(
            f"| {name} | {plain * 1e3:.1f} ms | {first * 1e3:.1f} ms | {first / plain:.2f}x "
            f"| {later * 1e3:.1f} ms | {later / plain:.2f}x |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
