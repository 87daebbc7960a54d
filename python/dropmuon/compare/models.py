"""The models of the comparisons: the paper's 3-layer CNN, a ResNet-18-style residual CNN and a
small vision transformer for images (:data:`IMAGE_MODELS`, built by :func:`build_model`), and a
small character-level GPT for text (:data:`TEXT_MODELS`, built by :func:`build_language_model`).

The paper (docs/method.md section 6) gives only the channel counts of its CNN (64, 128, 256); the
rest is our choice, stated here: 3x3 convolutions with padding 1, each followed by ReLU and 2x2
max-pooling, then one linear head on the flattened features.

The transformers are built for DropMuon's partition (:mod:`dropmuon.layers.partition`: a layer is a
module that directly holds parameters, ordered by the first forward pass): every matrix and
every norm is a module of its own (the attention's qkv and output projection are two
``nn.Linear``, never ``nn.MultiheadAttention``, whose ``in_proj_weight`` would hide them in one
parameter), and each block runs them in the order it registers them: norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2. Blocks are pre-norm (``x + attn(norm1(x))``, then
``x + mlp(norm2(x))``), as in ViT (Dosovitskiy et al. 2021) and GPT-2 (Radford et al. 2019).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_MODELS = ("paper-cnn", "resnet18", "vit")
TEXT_MODELS = ("gpt",)
MODELS = IMAGE_MODELS + TEXT_MODELS


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


class SelfAttention(nn.Module):
    """Multi-head self-attention: one qkv ``nn.Linear`` (``dim -> 3 * dim``), torch's
    ``scaled_dot_product_attention`` (causal if asked), one output ``nn.Linear``."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class MLP(nn.Module):
    """Linear (``dim -> hidden``) - GELU - Linear (``hidden -> dim``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``. Six layers."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PositionEmbedding(nn.Module):
    """A learned embedding per token position (``[tokens, dim]``, N(0, 0.02^2) at start), added
    to the input. A module of its own, so that it is a layer of its own."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(tokens, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight


class VisionTransformer(nn.Module):
    """A small ViT: non-overlapping ``patch_size`` patches embedded by a strided Conv2d, a learned
    position embedding, ``depth`` pre-norm blocks, a final LayerNorm and a linear head on the
    mean of the tokens (no class token). ``4 + 6 * depth`` layers in the Drop-Muon partition:
    patch, position, the blocks' norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, then norm
    and head."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
            )
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.position = PositionEmbedding((image_size // patch_size) ** 2, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.position(self.patch(x).flatten(2).transpose(1, 2))  # [B, tokens, dim]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


class CharGPT(nn.Module):
    """A small character-level GPT: token and position embeddings (``nn.Embedding``, summed),
    ``depth`` pre-norm causal blocks, a final LayerNorm and a linear head to the vocabulary,
    not tied to the token embedding. ``forward(idx [B, T] int64, T <= context)`` gives the
    next-token logits ``[B, T, vocab_size]``. ``4 + 6 * depth`` layers in the Drop-Muon
    partition: token, position, the blocks' six each, norm, head."""

    def __init__(
        self,
        vocab_size: int,
        context: int = 64,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.context = context
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, causal=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        tokens = idx.shape[1]
        if tokens > self.context:
            raise ValueError(
                f"sequence of {tokens} tokens is longer than the context {self.context}"
            )
        positions = torch.arange(tokens, device=idx.device)
        x = self.token(idx) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class WordTransformer(nn.Module):
    """pytorch/examples' word_language_model ``TransformerModel``, the transformer users bring
    from torch's tutorials (not one of the comparisons' models): an embedding scaled by sqrt(d),
    sinusoidal positions (a buffer), torch's ``nn.TransformerEncoder`` (``nn.MultiheadAttention``
    applies ``out_proj`` functionally) under a causal mask, a linear decoder. ``forward(tokens
    [B, T] int64, T <= context)`` gives logits ``[B, T, vocab]``."""

    def __init__(
        self, vocab: int, d: int = 64, heads: int = 2, layers: int = 2, context: int = 35,
        ff_mult: int = 4,
    ) -> None:  # fmt: skip
        super().__init__()
        self.d = d
        self.encoder = nn.Embedding(vocab, d)
        position = torch.arange(context).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
        pe = torch.zeros(context, d)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
        self.register_buffer("pe", pe)
        layer = nn.TransformerEncoderLayer(d, heads, ff_mult * d, dropout=0.0, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.decoder = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        h = self.encoder(tokens) * math.sqrt(self.d) + self.pe[:n]
        return self.decoder(self.transformer_encoder(h, mask=self.mask[:n, :n], is_causal=True))


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, **options):
    """An image classifier: ``paper-cnn``, ``resnet18`` (options: ``width``) or ``vit``
    (options: :class:`VisionTransformer`'s ``patch_size``, ``dim``, ``depth``, ``heads``,
    ``mlp_ratio``). Text models are built by :func:`build_language_model`."""
    if name == "paper-cnn":
        return PaperCNN(in_channels, num_classes, image_size)
    if name == "resnet18":
        return ResNet18(in_channels, num_classes, **options)
    if name == "vit":
        return VisionTransformer(in_channels, num_classes, image_size, **options)
    if name in TEXT_MODELS:
        raise ValueError(f"{name!r} is a text model; build it with build_language_model")
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(IMAGE_MODELS)}")


def build_language_model(name: str, vocab_size: int, context: int, **options):
    """A next-character model: ``gpt`` (options: :class:`CharGPT`'s ``dim``, ``depth``,
    ``heads``, ``mlp_ratio``)."""
    if name == "gpt":
        return CharGPT(vocab_size, context, **options)
    if name in IMAGE_MODELS:
        raise ValueError(f"{name!r} is an image model; build it with build_model")
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(TEXT_MODELS)}")
