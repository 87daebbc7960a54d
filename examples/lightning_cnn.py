"""DropMuon in PyTorch Lightning: configure_optimizers returns it, nothing else changes. The
paper's CNN on the shipped MNIST digits; checkpoints every 20 steps, and --resume continues the
same cutoff sequence.

    python examples/lightning_cnn.py [--steps 60] [--resume <dir>/step=20.ckpt]

Needs lightning (requirements-dev.txt).
"""

import argparse

import lightning
import torch
from torch import nn

import dropmuon
from dropmuon.compare.data import load_dataset
from dropmuon.compare.models import PaperCNN


class LitCNN(lightning.LightningModule):
    def __init__(self, data) -> None:
        super().__init__()
        self.model = PaperCNN(data.in_channels, data.num_classes, data.image_size)

    def training_step(self, batch, batch_index):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("loss", loss, prog_bar=True)
        self.log("cutoff", float(self.optimizers().optimizer.cutoff), prog_bar=True)
        return loss

    def configure_optimizers(self):
        # The model itself, so that DropMuon finds its layers; checkpoints hold its state.
        return dropmuon.DropMuon(self.model, lr=0.05, fallback="adamw", adamw_lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output", default="/tmp/dropmuon-lightning")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_dataset("mnist")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.train_x, data.train_y), batch_size=256, shuffle=True
    )
    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=args.output, every_n_train_steps=20, save_top_k=-1, filename="{step}"
    )
    trainer = lightning.Trainer(
        max_steps=args.steps, accelerator="auto", logger=False, callbacks=[checkpoints]
    )
    module = LitCNN(data)
    trainer.fit(module, loader, ckpt_path=args.resume)
    x, y = data.test_x[:2000], data.test_y[:2000]
    with torch.no_grad():
        accuracy = (module.model(x).argmax(1) == y).float().mean().item()
    print(f"test accuracy on 2,000 digits after {args.steps} steps: {accuracy:.3f}")
    print(dropmuon.describe(trainer.optimizers[0]))


if __name__ == "__main__":
    main()
