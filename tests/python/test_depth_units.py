"""Depth units as layers (``DropMuon(model, layers="blocks")``): the units a transformer or
ResNet user would name (stem, each block, head) on a torchvision-style ResNet, the harness's ViT
and char GPT and torch's nn.TransformerEncoder; truncation, the first-forward order, roles,
checkpoints (resume bit for bit) and copies with them."""

import copy

import pytest
import torch
from dropin import FixedCutoff
from torch import nn

import dropmuon
from dropmuon.compare.models import WordTransformer, build_language_model, build_model


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchvisionStyleResNet(nn.Module):
    """torchvision's ResNet-18 layout (conv1, bn1, layer1..layer4 of two BasicBlocks, fc),
    narrow."""

    def __init__(self, width=8, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [width, 2 * width, 4 * width, 8 * width]
        cin = width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w))
            setattr(self, f"layer{i + 1}", blocks)
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


CASES = {
    "torchvision-resnet": (
        TorchvisionStyleResNet,
        lambda g: torch.randn(4, 3, 32, 32, generator=g),
        ["conv1+bn1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["fc"],
    ),
    "vit": (
        lambda: build_model("vit", 1, 10, 28),
        lambda g: torch.randn(4, 1, 28, 28, generator=g),
        ["patch+position", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "norm+head"],
    ),
    "char-gpt": (
        lambda: build_language_model("gpt", 65, 32),
        lambda g: torch.randint(0, 65, (4, 32), generator=g),
        ["token+position", "blocks.0", "blocks.1", "norm+head"],
    ),
    "nn.TransformerEncoder": (
        lambda: WordTransformer(50, d=16, heads=2, layers=2, context=8),
        lambda g: torch.randint(0, 50, (4, 8), generator=g),
        ["encoder", "transformer_encoder.layers.0", "transformer_encoder.layers.1", "decoder"],
    ),
}


def loss_of(model, x):
    out = model(x)
    return out.float().pow(2).mean()


@pytest.mark.parametrize("case", list(CASES))
def test_depth_units_are_the_stem_each_block_and_the_head(case):
    make, data, expected = CASES[case]
    torch.manual_seed(0)
    model = make()
    opt = dropmuon.DropMuon(model, lr=0.02, layers="blocks")
    loss_of(model, data(torch.Generator().manual_seed(0))).backward()
    opt.step()
    assert opt.layer_names() == expected and opt.layer_order == "first forward"
    # Every trainable parameter is in exactly one unit, each block's in its block.
    positions = {name: opt.layer_of(p) for name, p in model.named_parameters()}
    for name, position in positions.items():
        unit = opt.layer_names()[position]
        if "+" not in unit and unit not in ("fc", "decoder", "encoder"):
            assert name.startswith(unit + "."), (name, unit)
    table = dropmuon.describe(opt)
    assert all(unit in table for unit in expected)


@pytest.mark.parametrize("case", list(CASES))
def test_truncation_stops_the_backward_at_the_cutoff_unit(case):
    make, data, expected = CASES[case]
    torch.manual_seed(0)
    model = make()
    cutoff = len(expected) // 2
    opt = dropmuon.DropMuon(model, lr=0.02, layers="blocks", sampling=FixedCutoff(cutoff))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the traced first step, then a steady one
        opt.zero_grad()
        loss_of(model, data(g)).backward()
        for name, p in model.named_parameters():
            below = opt.layer_of(p) < cutoff
            assert (p.grad is None) == below, (name, opt.layer_of(p), cutoff)
        opt.step()
    assert all(p.requires_grad for p in model.parameters())  # the user's flags, as left


def test_embeddings_inside_a_unit_keep_their_role():
    torch.manual_seed(0)
    model = build_language_model("gpt", 65, 32)
    opt = dropmuon.DropMuon(model, lr=0.02, layers="blocks", norms={"embedding": "row"})
    assert opt.norm_of(model.token.weight) == "row"
    assert opt.norm_of(model.blocks[0].attn.qkv.weight) == "spectral"


def run(model, opt, data, steps, g):
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, data(g)).backward()
        opt.step()


@pytest.mark.parametrize("case", ["vit", "torchvision-resnet"])
def test_resume_with_depth_units_is_bit_for_bit(case):
    make, data, _ = CASES[case]
    torch.manual_seed(0)
    model = make()
    opt = dropmuon.DropMuon(model, lr=0.02, layers="blocks", seed=3)
    g = torch.Generator().manual_seed(1)
    run(model, opt, data, 3, g)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    g_state = g.get_state()
    run(model, opt, data, 4, g)

    torch.manual_seed(0)
    resumed = make()
    resumed.load_state_dict(saved_model)
    opt2 = dropmuon.DropMuon(resumed, lr=0.02, layers="blocks", seed=3)
    opt2.load_state_dict(saved_opt)
    g2 = torch.Generator()
    g2.set_state(g_state)
    run(resumed, opt2, data, 4, g2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt2.update_counts == opt.update_counts


def test_a_checkpoint_of_per_module_layers_does_not_load_into_depth_units():
    make, data, _ = CASES["vit"]
    torch.manual_seed(0)
    model = make()
    opt = dropmuon.DropMuon(model, lr=0.02)
    run(model, opt, data, 1, torch.Generator().manual_seed(0))
    units = dropmuon.DropMuon(model, lr=0.02, layers="blocks")
    with pytest.raises(ValueError, match="a different model or partition"):
        units.load_state_dict(opt.state_dict())


def test_a_copy_keeps_the_units_and_the_trajectory():
    make, data, _ = CASES["char-gpt"]
    torch.manual_seed(0)
    model = make()
    opt = dropmuon.DropMuon(model, lr=0.02, layers="blocks", seed=1)
    g = torch.Generator().manual_seed(0)
    run(model, opt, data, 2, g)
    model2, opt2 = copy.deepcopy((model, opt))
    g2 = torch.Generator()
    g2.set_state(g.get_state())
    run(model, opt, data, 3, g)
    run(model2, opt2, data, 3, g2)
    assert opt2.layer_names() == opt.layer_names()
    assert opt2.norm_of(model2.token.weight) == opt.norm_of(model.token.weight)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_parameter_list_finds_depth_units_at_the_first_forward():
    make, data, expected = CASES["vit"]
    torch.manual_seed(0)
    model = make()
    opt = dropmuon.DropMuon(model.parameters(), lr=0.02, layers="blocks")
    run(model, opt, data, 1, torch.Generator().manual_seed(0))
    assert opt.layer_names() == expected


def test_bad_layers_values_are_refused():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="layers must be one of"):
        dropmuon.DropMuon(model, layers="block")
    with pytest.raises(ValueError, match="layers"):
        dropmuon.DropMuon([{"params": list(model.parameters()), "layers": "blocks"}])


def test_without_repeated_blocks_the_units_are_the_modules():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    a = dropmuon.DropMuon(model, layers="blocks")
    b = dropmuon.DropMuon(model, layers="modules")
    assert a.layer_names() == b.layer_names() == ["0", "2"]
