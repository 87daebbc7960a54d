"""The models of the comparisons: the paper's 3-layer CNN and a ResNet-18-style residual CNN.

The paper (docs/method.md section 6) gives only the channel counts of its CNN (64, 128, 256); the
rest is our choice, stated here: 3x3 convolutions with padding 1, each followed by ReLU and 2x2
max-pooling, then one linear head on the flattened features.
"""

from __future__ import annotations

from torch import Tensor, nn


class PaperCNN(nn.Module):
    """conv3x3(64) - ReLU - maxpool2 - conv3x3(128) - ReLU - maxpool2 - conv3x3(256) - ReLU -
    maxpool2 - linear. Four layers in the Drop-Muon partition (3 convs and the head)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        channels: tuple[int, int, int] = (64, 128, 256),
    ) -> None:
        super().__init__()
        blocks, c_in, size = [], in_channels, image_size
        for c_out in channels:
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, size = c_out, size // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in * size * size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 conv + batch-norm pairs with an identity (or 1x1 conv) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 layout (He et al. 2016; 4 stages of 2 basic blocks) with a 3x3 stem for small
    images (no 7x7 conv, no stem max-pool), global average pooling and a linear head. ``width``
    is the first stage's channel count (64 in the original; smaller for CPU runs)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages, c_in = [], width
        for stage, multiplier in enumerate((1, 2, 4, 8)):
            c_out = width * multiplier
            stride = 1 if stage == 0 else 2
            stages += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, **options):
    """``paper-cnn`` or ``resnet18`` (options: ``width``)."""
    if name == "paper-cnn":
        return PaperCNN(in_channels, num_classes, image_size)
    if name == "resnet18":
        return ResNet18(in_channels, num_classes, **options)
    raise ValueError(f"unknown model {name!r}; choose paper-cnn or resnet18")
