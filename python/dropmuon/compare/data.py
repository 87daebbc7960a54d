"""Datasets for the comparisons, held in memory as tensors and batched by index tensors.

- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` IDX files (60,000 + 10,000), from
  ``/usr/share/datasets/fashion-mnist`` unless a directory is given.
- ``mnist``: the 10,000 real MNIST digits shipped with this package (8,000 + 2,000; see
  ``datasets/mnist-10k/README.md`` for their origin and licence).
- ``cifar10``: a local copy in the standard python-pickle layout (``data_batch_1..5``,
  ``test_batch``); pickles can run code, so load only a copy you trust.
- ``synthetic``: a small generated set (seconds to train on; for tests).

Images become float32 in [0, 1], standardised with the training set's per-channel mean and
standard deviation.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DATASETS = ("fashion-mnist", "mnist", "cifar10", "synthetic")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_10K_DIR = Path(__file__).parent / "datasets" / "mnist-10k"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetError(ValueError):
    """A dataset that cannot be found or read; the message says what to do."""


class ImageShape:
    """``in_channels`` and ``image_size`` of a holder of [N, C, H, W] ``train_x``."""

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]


@dataclass
class Dataset(ImageShape):
    name: str
    train_x: Tensor  # [N, C, H, W] float32, standardised
    train_y: Tensor  # [N] int64
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    def to(self, device) -> Dataset:
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")}
        return Dataset(self.name, num_classes=self.num_classes, **move)


def load_dataset(name: str, data_dir: str | None = None, seed: int = 0) -> Dataset:
    """Loads a dataset by name (see the module docstring); ``data_dir`` overrides its folder."""
    if name == "fashion-mnist":
        return _idx_dataset(
            name,
            Path(data_dir or FASHION_MNIST_DIR),
            hint=(
                "install Debian's package (apt-get install dataset-fashion-mnist) or pass the "
                "folder holding the four IDX files"
            ),
        )
    if name == "mnist":
        return _idx_dataset(
            name,
            Path(data_dir) if data_dir else MNIST_10K_DIR,
            hint="the package ships these files; reinstall it",
        )
    if name == "cifar10":
        if not data_dir:
            raise DatasetError(
                "cifar10 needs --data-dir: a folder with data_batch_1..5 and "
                "test_batch (the python-pickle layout)"
            )
        return _cifar10(Path(data_dir))
    if name == "synthetic":
        return synthetic_dataset(seed=seed)
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def read_idx(path: Path) -> Tensor:
    """An IDX file (optionally gzip-compressed) as a uint8 tensor of its shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise DatasetError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = data[4 + 4 * ndim :]
    expected = 1
    for size in shape:
        expected *= size
    if len(payload) != expected:
        raise DatasetError(f"{path}: holds {len(payload)} bytes, its header says {expected}")
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(stem)


def _idx_dataset(name: str, folder: Path, hint: str) -> Dataset:
    if not folder.is_dir():
        raise DatasetError(f"{name}: no folder {folder}; {hint}")
    try:
        arrays = {
            split: (read_idx(_find(folder, images)), read_idx(_find(folder, labels)))
            for split, (images, labels) in IDX_FILES.items()
        }
    except FileNotFoundError as missing:
        raise DatasetError(f"{name}: {folder} has no {missing}(.gz); {hint}") from None
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    for x, y, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if x.dim() != 3 or y.dim() != 1 or len(x) != len(y):
            raise DatasetError(
                f"{name}: {split} images {tuple(x.shape)} and labels {tuple(y.shape)} do not match"
            )
    return _standardise(name, train_x.unsqueeze(1), train_y, test_x.unsqueeze(1), test_y, 10)


def _cifar10(folder: Path) -> Dataset:
    def batch(file: str):
        path = folder / file
        if not path.is_file():
            raise DatasetError(f"cifar10: {folder} has no {file} (python-pickle layout expected)")
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        x = torch.as_tensor(entry[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
        return x, torch.as_tensor(entry[b"labels"], dtype=torch.int64)

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = batch("test_batch")
    train_x = torch.cat([x for x, _ in train])
    train_y = torch.cat([y for _, y in train])
    return _standardise("cifar10", train_x, train_y, test_x, test_y, 10)


def _standardise(name, train_x, train_y, test_x, test_y, num_classes) -> Dataset:
    train = train_x.float().div_(255)
    test = test_x.float().div_(255)
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
    return Dataset(
        name,
        (train - mean) / std,
        train_y.long(),
        (test - mean) / std,
        test_y.long(),
        num_classes,
    )


def synthetic_dataset(
    train_size: int = 1024, test_size: int = 256, image_size: int = 12, seed: int = 0
) -> Dataset:
    """10 classes of 1-channel images: a faint random prototype per class under strong noise,
    so that accuracy rises within a few steps but is not trivially 100%."""
    g = torch.Generator().manual_seed(seed)
    prototypes = 0.5 + 0.15 * torch.randn(10, 1, image_size, image_size, generator=g)

    def split(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = prototypes[y] + 0.35 * torch.randn(n, 1, image_size, image_size, generator=g)
        return (x.clamp(0, 1) * 255).to(torch.uint8), y

    (train_x, train_y), (test_x, test_y) = split(train_size), split(test_size)
    return _standardise("synthetic", train_x, train_y, test_x, test_y, 10)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """How many batches ``batches`` gives for ``n`` examples (the last partial one dropped)."""
    return max(1, n // batch_size)


def batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True):
    """Index tensors of one shuffled epoch (no per-sample Python work)."""
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]
