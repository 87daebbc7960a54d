"""The README's first example on a transformer: pytorch/examples' word_language_model model
(torch's nn.TransformerEncoder) trained word by word on Debian's fortunes.

    python examples/train_transformer.py [--steps 200] [--sampling uniform]

The optimizer line is the README's, unchanged. The text is lower-cased and split into words
and punctuation; the 10,000 most frequent words are the vocabulary (the rest is <unk>). Needs
Debian's fortunes package (``apt-get install fortunes``; scripts/setup.sh installs it).
"""

import argparse
import collections
import math
import re

import torch
from torch import nn

import dropmuon
from dropmuon.compare.models import WordTransformer
from dropmuon.compare.text import load_text, windows


def word_tokens(vocab_size: int = 10_000) -> tuple[torch.Tensor, int]:
    text = load_text("fortunes")
    words = re.findall(r"[a-z0-9']+|[^a-z0-9'\s]", text.decode(text.train).lower())
    index = {
        w: i + 1 for i, (w, _) in enumerate(collections.Counter(words).most_common(vocab_size))
    }
    return torch.tensor([index.get(w, 0) for w in words]), vocab_size + 1  # 0 is <unk>


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sampling", default="uniform")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokens, vocab = word_tokens()
    train, val = tokens[:-50_000], tokens[-50_000:]
    model = WordTransformer(vocab)
    opt = dropmuon.DropMuon(model, lr=0.05, sampling=args.sampling)  # the README's line
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    vx, vy = windows(val, torch.arange(0, len(val) - 36, 97)[:256], 35)

    for step in range(1, args.steps + 1):
        x, y = windows(
            train, torch.randint(0, len(train) - 36, (args.batch_size,), generator=g), 35
        )
        opt.zero_grad()
        loss = loss_fn(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps:
            with torch.no_grad():
                val_loss = loss_fn(model(vx).flatten(0, 1), vy.flatten()).item()
            print(
                f"step {step:4d}  train {loss.item():.3f}  validation {val_loss:.3f} nats/word "
                f"(perplexity {math.exp(val_loss):.0f})  next cutoff {opt.cutoff}"
            )
    print(f"updates per layer {opt.update_counts}")


if __name__ == "__main__":
    main()
