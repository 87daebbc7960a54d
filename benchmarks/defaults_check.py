"""Do DropMuon's defaults train the models users bring? (issue 22, finding 9)

Trains, with the README's first example (``DropMuon(model, lr=..., sampling=...)``, nothing else
set) and with the alternatives for the parameters Newton-Schulz does not suit, two models:

- ``transformer``: pytorch/examples' word_language_model ``TransformerModel`` architecture
  (token embedding scaled by sqrt(d), sinusoidal positions, ``nn.TransformerEncoder`` with a
  causal mask, linear decoder), character level on Debian's fortunes (2 layers, d=64, 2 heads,
  context 64, batch 32); metric: validation cross-entropy in nats per character (lower is
  better; the unigram entropy of the text is about 3.3).
- ``word``: the same architecture at word level, as word_language_model trains it: the
  fortunes text lower-cased and split into words and punctuation, its 10,000 most frequent
  words plus ``<unk>`` as the vocabulary (a 10,001-way decoder with a bias, like the example's
  33,278-way one), context 35, batch 32; metric: validation cross-entropy in nats per word.
- ``cnn``: the paper CNN on 12,000 Fashion-MNIST training images (batch 256); metric: accuracy
  on 4,000 held-out training images.

Configurations: ``fallback`` ``sign`` (0.1's default) or ``adamw`` (vectors on AdamW), and
``adamw+emb``: vectors and the embedding on AdamW (``norms={"embedding": "adamw"}``); with AdamW
at the spectral lr, or at a twentieth of it (``/20``); each with Muon (every layer) and DropMuon
(uniform). One line of JSON per run in ``--output`` (runs already there are skipped, so an
interrupted check resumes; ``--table`` prints what is there):

    python benchmarks/defaults_check.py --models transformer --steps 600 --seeds 0 1
    python benchmarks/defaults_check.py --models word --steps 300 --configs sign adamw adamw/20
    python benchmarks/defaults_check.py --models cnn --steps 300 --lrs 0.05
    python benchmarks/defaults_check.py --table
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import time
from pathlib import Path

import torch
from torch import nn

import dropmuon
from dropmuon.compare.data import load_dataset
from dropmuon.compare.models import PaperCNN, WordTransformer
from dropmuon.compare.text import load_text, windows

CONFIGS = {
    "sign": dict(fallback="sign"),
    "adamw": dict(fallback="adamw"),
    "adamw+emb": dict(fallback="adamw", norms={"embedding": "adamw"}),
    # AdamW at a twentieth of the spectral lr (0.0025 at 0.05, 0.001 at 0.02)
    "adamw/20": dict(fallback="adamw", adamw_lr_ratio=0.05),
    "adamw/20+emb": dict(fallback="adamw", adamw_lr_ratio=0.05, norms={"embedding": "adamw"}),
}


def options(config: dict, lr: float) -> dict:
    config = dict(config)
    ratio = config.pop("adamw_lr_ratio", None)
    return config if ratio is None else dict(config, adamw_lr=ratio * lr)


def run_transformer(config: dict, sampling: str, lr: float, steps: int, seed: int) -> dict:
    text = load_text("fortunes")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = WordTransformer(text.vocab_size, context=64)
    opt = dropmuon.DropMuon(model, lr=lr, sampling=sampling, seed=seed, **options(config, lr))
    return train_lm(model, opt, text.train[:-100_000], text.train[-100_000:], 64, steps, g, 256)


def train_lm(model, opt, train_tokens, val_tokens, context, steps, g, val_windows=None) -> dict:
    """``steps`` steps on random windows of ``train_tokens`` (batch 32); the validation loss
    on every 97th window of ``val_tokens`` (the first ``val_windows``) after each quarter."""
    val_starts = torch.arange(0, len(val_tokens) - context - 1, 97)[:val_windows]
    vx, vy = windows(val_tokens, val_starts, context)
    curve, start = [], time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(train_tokens) - context - 1, (32,), generator=g)
        x, y = windows(train_tokens, starts, context)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        if (step + 1) % (steps // 4) == 0:
            with torch.no_grad():
                val = nn.functional.cross_entropy(model(vx).flatten(0, 1), vy.flatten())
            curve.append(round(float(val), 4))
    return dict(metric=curve[-1], curve=curve, seconds=time.perf_counter() - start)


def word_tokens(vocab_size: int = 10_000):
    """The fortunes text as word tokens (0 is <unk>) and the vocabulary size."""
    text = load_text("fortunes")
    words = re.findall(r"[a-z0-9']+|[^a-z0-9'\s]", text.decode(text.train).lower())
    counts = collections.Counter(words)
    index = {w: i + 1 for i, (w, _) in enumerate(counts.most_common(vocab_size))}
    return torch.tensor([index.get(w, 0) for w in words]), vocab_size + 1


def run_word(config: dict, sampling: str, lr: float, steps: int, seed: int) -> dict:
    tokens, vocab = word_tokens()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = WordTransformer(vocab, context=35)
    opt = dropmuon.DropMuon(model, lr=lr, sampling=sampling, seed=seed, **options(config, lr))
    return train_lm(model, opt, tokens[:-50_000], tokens[-50_000:], 35, steps, g)


def run_cnn(config: dict, sampling: str, lr: float, steps: int, seed: int) -> dict:
    data = load_dataset("fashion-mnist")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PaperCNN(data.in_channels, data.num_classes, data.image_size)
    opt = dropmuon.DropMuon(model, lr=lr, sampling=sampling, seed=seed, **options(config, lr))
    train_x, train_y = data.train_x[:12_000], data.train_y[:12_000]
    held_x, held_y = data.train_x[-2_000:], data.train_y[-2_000:]
    curve, start = [], time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, len(train_x), (256,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(train_x[index]), train_y[index]).backward()
        opt.step()
        if (step + 1) % (steps // 4) == 0:
            with torch.no_grad():
                accuracy = (model(held_x).argmax(1) == held_y).float().mean()
            curve.append(round(float(accuracy), 4))
    return dict(metric=curve[-1], curve=curve, seconds=time.perf_counter() - start)


def table(path: Path) -> str:
    """The runs in ``path`` as a markdown table: mean metric over seeds per model, lr, sampling
    and configuration (validation loss: lower is better; cnn: accuracy, higher is better)."""
    cells: dict = collections.defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        model, lr, sampling, name, _, steps = row["key"]
        cells[(model, steps, lr, sampling, name)].append(row["metric"])
    names = list(CONFIGS)
    lines = [
        "| model | steps | lr | sampling | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for key in sorted({k[:4] for k in cells}):
        values = [cells.get((*key, name)) for name in names]
        shown = [
            f"{sum(v) / len(v):.3f}" + (f" (n={len(v)})" if len(v) > 1 else "") if v else "-"
            for v in values
        ]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="benchmarks/results/defaults/runs.jsonl")
    parser.add_argument("--models", nargs="+", default=["transformer", "cnn"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.05, 0.02])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--samplings", nargs="+", default=["full", "uniform"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--table", action="store_true", help="print the runs as a table, run none")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.output)))
        return
    torch.set_num_threads(2)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {tuple(json.loads(line)["key"]) for line in out.read_text().splitlines()}
    runners = {"transformer": run_transformer, "word": run_word, "cnn": run_cnn}
    for model in args.models:
        for lr in args.lrs:
            for sampling in args.samplings:
                for name in args.configs:
                    config = CONFIGS[name]
                    for seed in args.seeds:
                        key = (model, lr, sampling, name, seed, args.steps)
                        if key in done:
                            continue
                        result = runners[model](config, sampling, lr, args.steps, seed)
                        row = dict(key=list(key), **result)
                        print(json.dumps(row), flush=True)
                        with out.open("a") as f:
                            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
