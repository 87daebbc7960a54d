"""Issue 23: the layers are ordered by where the forward first uses their parameters, on the
architectures and param-group styles users bring, and truncation then does exactly the work the
cost model says at every cutoff.

Both checks are computed here independently of DropMuon's own trace (a torch *function* mode):

(a) the first-use order comes from a torch *dispatch* mode that records the first aten op
    reading each parameter, on a plain forward before any optimizer exists;
(b) the cost model is evaluated op by op: a dispatch mode follows which tensors depend on an
    active layer's parameters (the layers at and above the cutoff, by the order DropMuon chose)
    and predicts, for every matrix product and convolution, one forward's FLOPs per operand that
    needs a gradient; torch.utils.flop_counter.FlopCounterMode measures the real backward. The
    attention core (SDPA) is left out of both sides.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from dropin import FixedCutoff
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import dropmuon
from dropmuon.compare.models import (
    CharGPT,
    PaperCNN,
    ResNet18,
    VisionTransformer,
    WordTransformer,
)

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
CONVOLUTION = aten.convolution.default
MEASURED_OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward")


def tensors_in(values):
    for value in values:
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from tensors_in(value)


class FirstUse(TorchDispatchMode):
    """The index of the first aten op that reads each tensor (by id)."""

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[int, int] = {}
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tensors_in((*args, *kwargs.values())):
            self.first.setdefault(id(t), self.ops)
        self.ops += 1
        return func(*args, **kwargs)


class CostModel(TorchDispatchMode):
    """Follows which tensors depend on ``sources`` (the active layers' parameters) and sums,
    over matrix products and convolutions, forward FLOPs times the operands that depend."""

    def __init__(self, sources) -> None:
        super().__init__()
        self.live = {id(p): p for p in sources}  # kept alive so that ids stay unique
        self.backward_flops = 0

    def depends(self, t) -> bool:
        return isinstance(t, Tensor) and id(t) in self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in MATMULS:
            a, b = (args[0], args[1]) if func in (aten.mm.default, aten.bmm.default) else args[1:3]
            flops = 2 * a.numel() * b.shape[-1]
            self.backward_flops += flops * (self.depends(a) + self.depends(b))
        elif func is CONVOLUTION:
            x, w = args[0], args[1]
            flops = 2 * out.numel() * w[0].numel()
            self.backward_flops += flops * (self.depends(x) + self.depends(w))
        inputs = list(tensors_in((*args, *kwargs.values())))
        if any(self.depends(t) for t in inputs):
            for t in tensors_in(out if isinstance(out, (list, tuple)) else (out,)):
                self.live[id(t)] = t
            if func._schema.is_mutable and inputs:  # an in-place op: its first argument too
                self.live[id(inputs[0])] = inputs[0]
        return out


# -- the architectures ---------------------------------------------------------------------


class TorchSeq2Seq(nn.Module):
    """torch's nn.Transformer (encoder and decoder, each with its final norm)."""

    def __init__(self, vocab=40, dim=32) -> None:
        super().__init__()
        self.head = nn.Linear(dim, vocab)  # registered first: the order must not come from here
        self.transformer = nn.Transformer(dim, 2, 1, 1, 64, dropout=0.0, batch_first=True)
        self.src_embed = nn.Embedding(vocab, dim)
        self.tgt_embed = nn.Embedding(vocab, dim)

    def forward(self, idx):
        src, tgt = idx[:, :6], idx[:, 6:]
        return self.head(self.transformer(self.src_embed(src), self.tgt_embed(tgt)))


class FunctionalChild(nn.Module):
    """A child whose weight the parent applies functionally (the child is never called)."""

    def __init__(self, dim=24) -> None:
        super().__init__()
        self.head = nn.Linear(dim, 5)
        self.mix = nn.Linear(dim, dim)
        self.body = nn.Sequential(nn.Linear(12, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Tanh())

    def forward(self, x):
        h = torch.tanh(F.linear(self.body(x), self.mix.weight, self.mix.bias))
        return self.head(h)


class WhitenedConvNet(nn.Module):
    """airbench's shape: a fixed-size whitening conv applied with F.conv2d (its module never
    called), then conv/BatchNorm/GELU blocks and a linear head."""

    def __init__(self, width=8) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Conv2d(2 * 3 * 4, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.GELU(),
        )
        self.head = nn.Linear(width, 10, bias=False)
        self.whiten = nn.Conv2d(3, 2 * 3 * 4, 2, padding=0, bias=True)

    def forward(self, x):
        x = F.conv2d(x, self.whiten.weight, self.whiten.bias)
        x = self.blocks(x)
        return self.head(x.amax((2, 3)))


def hf_models():
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    )
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(intermediate_size=64, max_position_embeddings=32, **small)
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            intermediate_size=64, num_key_value_heads=1, max_position_embeddings=32, **small
        )
    )
    return gpt2, bert, llama


def lm_loss(model, idx):
    out = model(idx)
    logits = out.logits if hasattr(out, "logits") else out
    targets = idx[:, -logits.shape[1] :]  # a seq2seq model predicts the target part
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten() % logits.shape[-1])


def image_loss(model, x):
    return model(x).square().mean()


def decay_groups(model):
    """nanoGPT's configure_optimizers: matrices decay, vectors do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def case(name):
    """(model, params for DropMuon built from it, input, loss, name of the output layer)."""
    torch.manual_seed(0)
    idx = torch.randint(0, 40, (2, 12))
    if name == "nn.TransformerEncoder":
        # pytorch/examples' word_language_model: every torch tutorial's transformer
        return WordTransformer(50, 32, context=12, ff_mult=2), None, idx, lm_loss, "decoder"
    if name == "nn.Transformer":
        return TorchSeq2Seq(), None, idx, lm_loss, "head"
    if name == "functional child":
        return FunctionalChild(), None, torch.randn(4, 12), image_loss, "head"
    if name == "whitening conv":
        return WhitenedConvNet(), None, torch.randn(2, 3, 9, 9), image_loss, "head"
    if name in ("hf gpt2 (tied)", "hf bert", "hf llama"):
        gpt2, bert, llama = hf_models()
        model, last = {
            "hf gpt2 (tied)": (gpt2, "transformer.ln_f"),  # the head is the token embedding
            "hf bert": (bert, "cls.predictions"),  # its output bias (the decoder is tied)
            "hf llama": (llama, "lm_head"),
        }[name]
        return model, None, idx, lm_loss, last
    if name == "nanoGPT decay groups":
        model = CharGPT(40, context=16, dim=32, depth=2, heads=2)
        return model, decay_groups, idx, lm_loss, "head"
    if name == "harness paper-cnn":
        return PaperCNN(1, 10, 28), None, torch.randn(2, 1, 28, 28), image_loss, "head"
    if name == "harness resnet18":
        return ResNet18(1, 10, width=8), None, torch.randn(2, 1, 16, 16), image_loss, "head"
    if name == "harness vit":
        model = VisionTransformer(1, 10, 16, patch_size=4, dim=32, depth=2, heads=2)
        return model, None, torch.randn(2, 1, 16, 16), image_loss, "head"
    if name == "harness gpt":
        return CharGPT(40, context=16, dim=32, depth=2, heads=2), None, idx, lm_loss, "head"
    raise ValueError(name)


CASES = [
    "nn.TransformerEncoder",
    "nn.Transformer",
    "functional child",
    "whitening conv",
    "hf gpt2 (tied)",
    "hf bert",
    "hf llama",
    "nanoGPT decay groups",
    "harness paper-cnn",
    "harness resnet18",
    "harness vit",
    "harness gpt",
]


def backward_flops(loss) -> int:
    """The FLOPs of ``loss.backward()`` in matrix products and convolutions (SDPA left out)."""
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    counts = counter.get_flop_counts().get("Global", {})
    return sum(v for op, v in counts.items() if str(op).split(".")[-1] in MEASURED_OPS)


def optimizer_for(model, groups, **options):
    return dropmuon.DropMuon(groups(model) if groups else model, lr=0.01, **options)


def one_step(model, opt, x, loss_fn):
    opt.zero_grad()
    loss_fn(model, x).backward()
    opt.step()


def expected_order(opt, model, x, loss_fn) -> list[str]:
    """The layers sorted by the first aten op that reads one of their parameters (layers never
    read first, in registration order), from a plain forward of ``model``."""
    with FirstUse() as uses:
        loss_fn(model, x)
    layers = {}
    for group in opt.param_groups:
        for p in group["params"]:
            layers.setdefault(opt.layer_of(p), []).append(uses.first.get(id(p), -1))
    assert min(min(uses) for uses in layers.values()) >= 0, "every layer is read"
    names = opt.layer_names()
    keyed = sorted(range(len(names)), key=lambda position: (min(layers[position]), position))
    return [names[position] for position in keyed]


@pytest.mark.parametrize("name", CASES)
def test_layers_follow_first_use_and_backward_flops_follow_the_cost_model(name):
    model, groups, x, loss_fn, last = case(name)
    pristine = copy.deepcopy(model)
    opt = optimizer_for(model, groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dropmuon.DropMuonWarning)  # no false alarm
        for _ in range(6):  # the cutoff input check runs at the first pass with each cutoff
            one_step(model, opt, x, loss_fn)
    assert opt.layer_order == "first forward"
    # (a) the order of first use, the output layer last.
    reference = copy.deepcopy(pristine)
    reference_opt = optimizer_for(reference, groups, sampling="full")
    one_step(reference, reference_opt, x, loss_fn)
    expected = expected_order(reference_opt, reference, x, loss_fn)
    assert opt.layer_names() == expected
    assert opt.layer_names()[-1] == last

    # (b) backward FLOPs at every cutoff within 5% of the op-level cost model.
    n = opt.num_layers
    cutoffs = range(n) if n <= 10 else sorted({0, 1, 2, n // 3, n // 2, 2 * n // 3, n - 2, n - 1})
    full = None
    for cutoff in cutoffs:
        m = copy.deepcopy(pristine)
        o = optimizer_for(m, groups, sampling=FixedCutoff(cutoff))
        o.zero_grad()
        traced = backward_flops(loss_fn(m, x))  # step 0: layers frozen as they are placed
        o.step()
        o.zero_grad()
        active = [p for g in o.param_groups for p in g["params"] if o.is_active(p)]
        with CostModel(active) as cost:
            loss = loss_fn(m, x)
        measured = backward_flops(loss)
        predicted = cost.backward_flops
        assert measured == pytest.approx(predicted, rel=0.05), (name, cutoff)
        assert traced == measured, (name, cutoff)  # step 0 truncated the same way
        frozen = [p for g in o.param_groups for p in g["params"] if not o.is_active(p)]
        assert all(p.grad is None for p in frozen), (name, cutoff)
        full = measured if cutoff == 0 else full
        if cutoff == n - 1:  # the output layer alone: a small part of the full backward
            assert measured < 0.5 * full, (name, measured, full)


def test_hf_llama_top_only_backward_is_a_few_percent_of_the_full_one():
    """The issue's control: a top-only cutoff on HF Llama ran 3% of the full backward."""
    _, _, llama = hf_models()
    idx = torch.randint(0, 40, (2, 12))
    flops = []
    opt = dropmuon.DropMuon(copy.deepcopy(llama), sampling="full")
    for cutoff in (0, opt.num_layers - 1):
        m = copy.deepcopy(llama)
        o = dropmuon.DropMuon(m, sampling=FixedCutoff(cutoff))
        one_step(m, o, idx, lm_loss)
        o.zero_grad()
        loss = lm_loss(m, idx)
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        flops.append(counter.get_total_flops())
    assert flops[1] < 0.25 * flops[0]


# -- what the user sees when the order cannot be established --------------------------------


def test_a_parameter_the_forward_never_uses_is_ordered_first_and_named():
    model = FunctionalChild()
    spare = nn.Parameter(torch.randn(3, 3))
    opt = dropmuon.DropMuon([*model.parameters(), spare], lr=0.01, sampling=FixedCutoff(1))
    with pytest.warns(dropmuon.LayerOrderWarning, match=r"never used the parameters of "):
        one_step(model, opt, torch.randn(4, 12), image_loss)
    assert opt.layer_of(spare) == 0 and opt.layer_names()[-1] == "head"


def test_a_cutoff_above_every_used_layer_in_the_first_forward_is_a_clear_error():
    model = FunctionalChild()
    spare = nn.Parameter(torch.randn(3, 3))
    opt = dropmuon.DropMuon([*model.parameters(), spare], lr=0.01, sampling=FixedCutoff(4))
    with pytest.raises(RuntimeError, match="never used by it"):
        image_loss(model, torch.randn(4, 12))
    assert all(p.requires_grad for p in model.parameters())  # the pass's freeze was lifted
    assert opt.num_layers == 5


def test_a_step_before_any_forward_says_the_order_is_unknown():
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    opt = dropmuon.DropMuon([a, b], lr=0.01)
    a.grad, b.grad = torch.randn(4, 4), torch.randn(4, 4)
    with pytest.warns(dropmuon.LayerOrderWarning, match="order in which the model uses"):
        opt.step()
    assert opt.layer_order == "param groups" and opt.num_layers == 2


@pytest.mark.parametrize(
    "build", [lambda ps: dropmuon.Muon(ps), lambda ps: dropmuon.DropMuon(ps[:1])]
)
def test_no_order_warning_where_the_order_does_not_matter(build):
    """Muon updates every layer, and one parameter has one order."""
    params = [nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))]
    opt = build(params)
    for p in params:
        p.grad = torch.randn(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dropmuon.DropMuonWarning)
        opt.step()


@pytest.mark.parametrize("sampling", ["custom", [0.5, 0.5], (1.0,), torch.tensor([1.0])])
def test_custom_probabilities_need_layers_known_at_construction(sampling):
    model = FunctionalChild()
    with pytest.raises(ValueError, match="need the layers at construction"):
        dropmuon.DropMuon(model.parameters(), sampling=sampling)
    dropmuon.DropMuon(model, sampling=[0.25] * 4)  # a model's layers are known: accepted


def test_groups_are_read_as_hyperparameters_until_they_say_layer():
    model = CharGPT(40, context=16, dim=32, depth=1, heads=2)
    opt = dropmuon.DropMuon(decay_groups(model), lr=0.01)
    assert opt.num_layers == 1 and opt.layer_order.startswith("pending")
    one_step(model, opt, torch.randint(0, 40, (2, 8)), lm_loss)
    by_module = dropmuon.DropMuon(copy.deepcopy(model), lr=0.01)
    assert opt.num_layers == by_module.num_layers == 4 + 6
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0
    # "layer" keys still define the layers, in key order.
    keyed = dropmuon.DropMuon(
        [
            {"params": model.head.parameters(), "layer": 1},
            {"params": model.token.parameters(), "layer": 0},
        ]
    )
    assert keyed.layer_names() == ["layer 0", "layer 1"] and keyed.layer_order == "param groups"


def test_a_checkpoint_gives_a_pending_optimizer_its_layers_and_resumes_exactly():
    """A parameter-list optimizer resumed from a checkpoint before its first forward takes the
    checkpoint's layers and continues the very trajectory; a refused checkpoint leaves it
    pending."""
    x = torch.randn(4, 12)
    model = FunctionalChild()
    opt = dropmuon.DropMuon(model.parameters(), lr=0.01, seed=3)
    for _ in range(3):
        one_step(model, opt, x, image_loss)
    saved, twin = copy.deepcopy(opt.state_dict()), copy.deepcopy(model)
    resumed = dropmuon.DropMuon(twin.parameters(), lr=0.01, seed=3)
    wrong = copy.deepcopy(saved)
    wrong["param_groups"][0]["dropmuon"]["param_shapes"][0][0] = [99]
    with pytest.raises(ValueError):
        resumed.load_state_dict(wrong)
    assert resumed.layer_order.startswith("pending") and resumed.num_layers == 1
    resumed.load_state_dict(saved)
    assert resumed.layer_names() == opt.layer_names() and resumed.layer_order == "first forward"
    for _ in range(4):
        one_step(model, opt, x, image_loss)
        one_step(twin, resumed, x, image_loss)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize(
    "key, message",
    [
        ("momentun", "did you mean 'momentum'"),
        ("layers", "did you mean 'layer'"),
        ("adamw_betas", "is 'betas'"),
        ("adamw_lr", "is 'adamw_lr_ratio'"),
        ("fallback", "an option of the whole optimizer"),
    ],
)
def test_a_misspelt_or_misplaced_group_key_is_an_error(key, message):
    model = FunctionalChild()
    with pytest.raises(ValueError, match=message):
        dropmuon.DropMuon([{"params": model.parameters(), key: 0.9}])
    opt = dropmuon.DropMuon([{"params": model.head.parameters()}])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": model.mix.parameters(), key: 0.9})
    assert len(opt.param_groups) == 1


def test_a_groups_unknown_norm_is_named_as_the_groups():
    model = FunctionalChild()
    with pytest.raises(ValueError, match="a param group's 'norm' is 'spectal'"):
        dropmuon.DropMuon([{"params": model.parameters(), "norm": "spectal"}])


def test_the_order_is_adopted_when_the_first_forward_returns():
    """layer_names(), layer_of() and describe() are right between the first forward and the
    first step (a logger reading them then gets the real order)."""
    model = FunctionalChild()
    opt = dropmuon.DropMuon(model, lr=0.01)
    assert opt.layer_names()[0] == "head"  # registration order, before any forward
    loss = image_loss(model, torch.randn(4, 12))
    assert opt.layer_order == "first forward"
    assert opt.layer_names() == ["body.0", "body.2", "mix", "head"]
    assert opt.layer_of(model.head.weight) == 3 and "head" in dropmuon.describe(opt)
    loss.backward()
    frozen = [p for p in model.parameters() if not opt.is_active(p)]
    assert all(p.grad is None for p in frozen)  # step 0's freeze followed the same positions
    opt.step()


def test_unknown_group_keys_are_kept_as_torch_keeps_them():
    model = FunctionalChild()
    opt = dropmuon.DropMuon([{"params": model.parameters(), "name": "all", "initial_lr": 0.1}])
    assert opt.param_groups[0]["name"] == "all"
    assert opt.state_dict()["param_groups"][0]["name"] == "all"


def test_keller_jordans_use_muon_false_groups_are_pointed_to_norm():
    model = FunctionalChild()
    with pytest.raises(ValueError, match="'norm': 'adamw'"):
        dropmuon.DropMuon(
            [
                {"params": [model.mix.weight], "use_muon": True},
                {"params": [model.mix.bias], "use_muon": False},
            ]
        )


# -- mixing DropMuon with another optimizer ------------------------------------------------


def test_another_optimizers_parameters_below_the_cutoff_are_named():
    """airbench's natural swap: DropMuon on the conv filters, SGD on the rest. The SGD
    parameters below the cutoff still need their gradients, so the backward reaches them; the
    warning says so and names them."""
    model = WhitenedConvNet()
    filters = [p for p in model.parameters() if p.dim() == 4]
    rest = [p for p in model.parameters() if p.dim() != 4]
    opt = dropmuon.DropMuon(filters, lr=0.01, sampling=FixedCutoff(2))
    sgd = torch.optim.SGD(rest, lr=0.01)
    x = torch.randn(2, 3, 9, 9)
    with pytest.warns(dropmuon.TruncationDefeatedWarning, match="does not manage") as record:
        for _ in range(3):
            opt.zero_grad()
            sgd.zero_grad()
            image_loss(model, x).backward()
            opt.step()
            sgd.step()
    text = str(next(w.message for w in record if w.category is dropmuon.TruncationDefeatedWarning))
    assert "whiten.bias" in text and "blocks.1." in text
    assert opt.layer_names() == ["whiten", "blocks.0", "blocks.4"]


def test_the_traced_forward_runs_the_same_aten_ops_as_a_plain_one():
    """Not a timing test (benchmarks/bench_first_forward.py measures it): the trace runs every
    torch function once through a Python mode, so it must not call any of them twice."""
    model = WordTransformer(50, 32, context=12, ff_mult=2)
    idx = torch.randint(0, 40, (2, 12))
    with FirstUse() as plain:
        lm_loss(model, idx)
    dropmuon.DropMuon(model, lr=0.01)
    with FirstUse() as traced:
        lm_loss(model, idx)
    assert traced.ops == plain.ops
    assert math.isfinite(float(lm_loss(model, idx)))
