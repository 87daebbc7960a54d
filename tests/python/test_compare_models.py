"""The harness's transformers (a ViT for images, a character-level GPT for text) under DropMuon:
they train, their layers come in forward order, and truncation cuts their backward work; and the
character-level texts they train on."""

import os

import pytest
import torch
from dropin import FixedCutoff
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dropmuon
from dropmuon.compare.data import DatasetError, synthetic_dataset
from dropmuon.compare.models import (
    IMAGE_MODELS,
    MODELS,
    TEXT_MODELS,
    CharGPT,
    VisionTransformer,
    build_language_model,
    build_model,
)
from dropmuon.compare.text import (
    FORTUNES_DIR,
    TEXT_DATASETS,
    load_text,
    synthetic_text,
    window_count,
    windows,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are so small that a second thread only waits, and
    under a busy CPU it waits for milliseconds per operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image_case():
    """A small ViT on 12x12 synthetic images (9 tokens) and one batch of them."""
    data = synthetic_dataset(train_size=64, test_size=8)
    model = VisionTransformer(1, 10, data.image_size, patch_size=4, dim=32, depth=2, heads=2)
    return model, data.train_x, data.train_y, nn.functional.cross_entropy


def text_case():
    """A small CharGPT on the synthetic text and one batch of 16 windows of 32 characters."""
    text = load_text("synthetic-text")
    context = 32
    starts = torch.randint(window_count(text.train, context), (16,))
    x, y = windows(text.train, starts, context)
    model = CharGPT(text.vocab_size, context, dim=32, depth=2, heads=2)

    def loss_fn(logits, targets):
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    return model, x, y, loss_fn


CASES = {"vit": image_case, "gpt": text_case}


# -- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_trains_with_dropmuon(name):
    model, x, y, loss_fn = CASES[name]()
    before = [p.detach().clone() for p in model.parameters()]
    opt = dropmuon.DropMuon(model, lr=0.02, fallback="adamw")
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(moved), [n for (n, _), m in zip(model.named_parameters(), moved) if not m]


def backward_flops(name: str, cutoff: int):
    """Backward FLOPs of one step at a fixed cutoff, after a warm-up step (which traces the
    layer order); and whether exactly the active layers' parameters got gradients."""
    torch.manual_seed(0)
    model, x, y, loss_fn = CASES[name]()
    opt = dropmuon.DropMuon(model, lr=0.02, fallback="adamw", sampling=FixedCutoff(cutoff))
    loss_fn(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    grads_match = all((p.grad is not None) == opt.is_active(p) for p in model.parameters())
    return counter.get_total_flops(), grads_match, opt.num_layers, model, x


@pytest.mark.parametrize("name", CASES)
def test_truncation_cuts_backward_flops(name):
    full, grads_match, num_layers, model, x = backward_flops(name, 0)
    assert grads_match
    flops = [full]
    for cutoff in range(1, num_layers):
        measured, grads_match, _, _, _ = backward_flops(name, cutoff)
        assert grads_match, cutoff
        flops.append(measured)
    assert all(a >= b for a, b in zip(flops, flops[1:])), flops
    mid, top = num_layers // 2, num_layers - 1
    assert flops[mid] < flops[0] and flops[top] < flops[mid], flops
    # At the top only the head's weight gradient is left: one product per head input row.
    head_rows = x.shape[0] if name == "vit" else x.numel()
    assert flops[top] == 2 * head_rows * model.head.in_features * model.head.out_features


def block_layers(depth):
    names = []
    for i in range(depth):
        names += [f"blocks.{i}.{n}" for n in ("norm1", "attn.qkv", "attn.proj", "norm2")]
        names += [f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"]
    return names


@pytest.mark.parametrize(
    "name, first", [("vit", ["patch", "position"]), ("gpt", ["token", "position"])]
)
def test_layers_follow_the_forward_order(name, first):
    model, x, y, loss_fn = CASES[name]()
    opt = dropmuon.DropMuon(model, lr=0.02, fallback="adamw")
    loss_fn(model(x), y).backward()
    opt.step()
    assert opt.layer_names() == first + block_layers(len(model.blocks)) + ["norm", "head"]
    assert opt.num_layers == 4 + 6 * len(model.blocks)


def test_gpt_is_causal():
    model = CharGPT(11, context=16, dim=32, depth=2, heads=2).eval()
    idx = torch.randint(11, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 11
    a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 11)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 17, dtype=torch.int64))


def test_builders():
    assert (
        set(MODELS)
        == set(IMAGE_MODELS) | set(TEXT_MODELS)
        == {
            "paper-cnn",
            "resnet18",
            "vit",
            "gpt",
        }
    )
    vit = build_model("vit", 3, 7, 32, patch_size=8, dim=32, depth=1)
    assert isinstance(vit, VisionTransformer) and len(vit.blocks) == 1
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    gpt = build_language_model("gpt", 20, 8, depth=1)
    assert isinstance(gpt, CharGPT)
    assert gpt(torch.zeros(3, 8, dtype=torch.int64)).shape == (3, 8, 20)
    with pytest.raises(ValueError, match="build_language_model"):
        build_model("gpt", 1, 10, 28)
    with pytest.raises(ValueError, match="build_model"):
        build_language_model("vit", 20, 8)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTransformer(image_size=30, patch_size=4)


# -- texts --------------------------------------------------------------------------------------


def test_synthetic_text_splits_and_round_trips():
    assert TEXT_DATASETS == ("fortunes", "synthetic-text")
    text = synthetic_text()
    data = load_text("synthetic-text")
    assert data.train.dtype == data.test.dtype == torch.int64
    assert data.train.dim() == data.test.dim() == 1
    assert len(data.train) + len(data.test) == len(text) == 40_000
    assert len(data.test) == len(text) // 10
    assert data.vocab == "".join(sorted(set(text))) and data.vocab_size == len(data.vocab)
    assert data.decode(data.encode(text)) == text
    # The test split is the text's tail, the train split its head: disjoint by position.
    assert data.decode(data.train) == text[: len(data.train)]
    assert data.decode(data.test) == text[len(data.train) :]
    assert synthetic_text(seed=1) != text and synthetic_text() == text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        data.encode("#")


def test_windows_are_next_character_pairs():
    tokens = torch.arange(100) * 3
    context = 8
    assert window_count(tokens, context) == 92 and window_count(tokens[:5], context) == 0
    starts = torch.tensor([0, 17, 91])
    x, y = windows(tokens, starts, context)
    assert x.shape == y.shape == (3, context)
    for row, s in enumerate(starts.tolist()):
        assert torch.equal(x[row], tokens[s : s + context])
        assert torch.equal(y[row], tokens[s + 1 : s + 1 + context])
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_fortunes_from_a_folder(tmp_path):
    (tmp_path / "b").write_text("two\n%\nthree\n")
    (tmp_path / "a").write_bytes(b"one\xff\n%\n")
    (tmp_path / "a.dat").write_bytes(b"\x00\x00\x00\x02XYZ")
    os.symlink("a", tmp_path / "a.u8")
    os.symlink("b", tmp_path / "link")
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "c").write_text("QQQ\n")
    data = load_text("fortunes", data_dir=str(tmp_path))
    text = data.decode(torch.cat([data.train, data.test]))
    assert text == "one\ufffd\n\ntwo\n\nthree\n"
    assert data.vocab == "".join(sorted(set(text)))
    assert len(data.test) == len(text) // 10


def test_fortunes_missing_says_how_to_get_it(tmp_path):
    for folder in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(DatasetError, match="apt-get install fortunes") as error:
            load_text("fortunes", data_dir=str(folder))
        assert "--data-dir" in str(error.value)
    with pytest.raises(DatasetError, match="unknown text"):
        load_text("shakespeare")


@pytest.mark.skipif(not os.path.isdir(FORTUNES_DIR), reason="apt-get install fortunes")
def test_fortunes_corpus():
    data = load_text("fortunes")
    size = len(data.train) + len(data.test)
    assert 1_000_000 < size < 10_000_000
    assert data.vocab_size < 200
    assert len(data.test) == size // 10
    assert "\n%\n" not in data.decode(data.test)
