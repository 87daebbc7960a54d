"""What a comparison trains on: the splits (train, validation, test) of an image-classification
or a language-modelling dataset, a training batch by index, and the evaluation metrics.

The splits come from fixed permutations (seed 0), the same for every run and optimizer:

- images: ``--val-size`` K holds out K training images as the validation split, chosen first;
  the training subset (``--train-size``) comes from the remaining images; the test set is the
  dataset's own (``--test-size`` a fixed subset of it). Train accuracy is measured on a fixed
  subset of the training subset (``--eval-train-size``).
- text: a "sample" is a window of ``context`` characters. The validation split is the last
  K * context characters of the training text (K non-overlapping windows), removed from the
  training text; training windows start anywhere in the rest; test windows are
  non-overlapping windows of the test text (``--test-size`` of them at most).

Metrics: ``train_acc``, ``val_acc``, ``test_acc`` (classification), ``train_loss``,
``val_loss``, ``test_loss`` (both; mean cross-entropy in nats, per character for text). A split
that is absent (no ``--val-size``) has no metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .data import ImageShape
from .text import TextDataset, window_count, windows


def _fixed_permutation(n: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


@dataclass
class ImageTask(ImageShape):
    """Classification: batches of images, accuracy and loss on fixed subsets."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor | None
    val_y: Tensor | None
    test_x: Tensor
    test_y: Tensor
    eval_train: Tensor  # indices into train_x
    num_classes: int
    kind = "classification"

    @staticmethod
    def from_dataset(data, val_size=None, train_size=None, test_size=None, eval_train_size=10000):
        order = _fixed_permutation(len(data.train_x))
        val_size = val_size or 0
        if val_size >= len(order):
            raise ValueError(f"--val-size {val_size} leaves no training images ({len(order)})")
        val, pool = order[:val_size], order[val_size:]
        train = pool[:train_size] if train_size else pool
        test = _fixed_permutation(len(data.test_x))[:test_size] if test_size else None
        test_x = data.test_x if test is None else data.test_x[test]
        test_y = data.test_y if test is None else data.test_y[test]
        return ImageTask(
            train_x=data.train_x[train],
            train_y=data.train_y[train],
            val_x=data.train_x[val] if val_size else None,
            val_y=data.train_y[val] if val_size else None,
            test_x=test_x,
            test_y=test_y,
            eval_train=_fixed_permutation(len(train))[:eval_train_size],
            num_classes=data.num_classes,
        )

    @property
    def num_train(self) -> int:
        return len(self.train_x)

    def sizes(self) -> dict:
        return dict(
            train_size=len(self.train_x),
            val_size=0 if self.val_x is None else len(self.val_x),
            test_size=len(self.test_x),
        )

    def to(self, device) -> ImageTask:
        move = {
            k: None if getattr(self, k) is None else getattr(self, k).to(device)
            for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "eval_train")
        }
        return ImageTask(num_classes=self.num_classes, **move)

    def for_warm_up(self) -> ImageTask:
        """The same training data with one-sample evaluations (a warm-up step's)."""
        return ImageTask(
            self.train_x, self.train_y, None, None, self.test_x[:1], self.test_y[:1],
            self.eval_train[:1], self.num_classes,
        )  # fmt: skip

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.train_x[idx], self.train_y[idx]

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, chunk: int = 2048) -> dict:
        model.eval()
        splits = {
            "train": (self.train_x[self.eval_train], self.train_y[self.eval_train]),
            "val": (self.val_x, self.val_y),
            "test": (self.test_x, self.test_y),
        }
        metrics = {}
        for split, (x, y) in splits.items():
            if x is None:
                continue
            correct, loss = 0, 0.0
            for start in range(0, len(x), chunk):
                logits = model(x[start : start + chunk])
                target = y[start : start + chunk]
                correct += int((logits.argmax(1) == target).sum())
                loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            metrics[f"{split}_acc"] = correct / len(x)
            metrics[f"{split}_loss"] = loss / len(x)
        model.train()
        return metrics


@dataclass
class TextTask:
    """Character-level language modelling: batches of windows, loss on fixed windows."""

    train: Tensor  # training text (tokens)
    val: Tensor | None
    test: Tensor
    context: int
    vocab_size: int
    eval_train: Tensor  # window starts in `train`
    test_starts: Tensor
    kind = "language-model"

    @staticmethod
    def from_dataset(
        data: TextDataset, context, val_size=None, train_size=None, test_size=None,
        eval_train_size=10000,
    ):  # fmt: skip
        text = data.train
        val = None
        if val_size:
            held = val_size * context + 1
            if held >= len(text) - context:
                raise ValueError(f"--val-size {val_size} leaves no training text")
            text, val = text[:-held], text[-held:]
        if train_size:  # a prefix of train_size windows' worth of characters
            text = text[: train_size + context]
        test_starts = torch.arange(0, window_count(data.test, context), context)
        if test_size:
            test_starts = test_starts[:test_size]
        n = window_count(text, context)
        return TextTask(
            train=text,
            val=val,
            test=data.test,
            context=context,
            vocab_size=data.vocab_size,
            eval_train=_fixed_permutation(n)[:eval_train_size],
            test_starts=test_starts,
        )

    @property
    def num_train(self) -> int:
        return window_count(self.train, self.context)

    def val_starts(self) -> Tensor:
        """Non-overlapping windows of the validation text."""
        return torch.arange(0, window_count(self.val, self.context), self.context)

    def sizes(self) -> dict:
        val = 0 if self.val is None else len(self.val_starts())
        return dict(train_size=self.num_train, val_size=val, test_size=len(self.test_starts))

    def to(self, device) -> TextTask:
        move = {
            k: None if getattr(self, k) is None else getattr(self, k).to(device)
            for k in ("train", "val", "test", "eval_train", "test_starts")
        }
        return TextTask(context=self.context, vocab_size=self.vocab_size, **move)

    def for_warm_up(self) -> TextTask:
        """The same training text with one-window evaluations (a warm-up step's)."""
        return TextTask(
            self.train, None, self.test, self.context, self.vocab_size, self.eval_train[:1],
            self.test_starts[:1],
        )  # fmt: skip

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return windows(self.train, idx, self.context)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, chunk: int = 256) -> dict:
        model.eval()
        splits = {"train": (self.train, self.eval_train), "test": (self.test, self.test_starts)}
        if self.val is not None:
            splits["val"] = (self.val, self.val_starts().to(self.val.device))
        metrics = {}
        for split, (tokens, starts) in splits.items():
            total, count = 0.0, 0
            for begin in range(0, len(starts), chunk):
                x, y = windows(tokens, starts[begin : begin + chunk], self.context)
                total += float(self.loss(model, x, y)) * y.numel()
                count += y.numel()
            metrics[f"{split}_loss"] = total / count
        model.train()
        return metrics
