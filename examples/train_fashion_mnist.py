"""DropMuon dropped into a plain PyTorch training loop (Fashion-MNIST, the paper's CNN).

    python examples/train_fashion_mnist.py [--steps 60] [--sampling uniform]

The only DropMuon-specific line is the optimizer's construction: it takes the model itself, so
that it can split it into layers and freeze the ones below each step's cutoff.
"""

import argparse

import torch
from torch import nn

import dropmuon
from dropmuon.compare.data import batches, load_dataset
from dropmuon.compare.models import PaperCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--sampling", default="uniform")
    parser.add_argument("--dataset", default="fashion-mnist")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_dataset(args.dataset)
    model = PaperCNN(data.in_channels, data.num_classes, data.image_size)
    opt = dropmuon.DropMuon(
        model, lr=0.05, weight_decay=0.0, sampling=args.sampling, fallback="adamw", adamw_lr=1e-3
    )
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(0)

    step = 0
    while step < args.steps:
        for idx in batches(len(data.train_x), args.batch_size, shuffle):
            opt.zero_grad()
            loss = loss_fn(model(data.train_x[idx]), data.train_y[idx])
            loss.backward()  # stops at the cutoff: frozen layers get no gradient
            opt.step()  # updates the active layers, then draws the next step's layers
            step += 1
            if step % 10 == 0:
                print(f"step {step:4d}  loss {loss.item():.3f}  next cutoff {opt.cutoff}")
            if step == args.steps:
                break

    with torch.no_grad():
        model.eval()
        accuracy = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    print(f"test accuracy {accuracy:.4f}; updates per layer {opt.update_counts}")
    print(dropmuon.describe(opt))


if __name__ == "__main__":
    main()
