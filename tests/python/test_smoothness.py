"""The smoothness estimates behind ``cost_optimal`` (dropmuon.layers.smoothness, docs/method.md
section 3): on one scale (the RMS->RMS operator norm) whatever a layer's shape or update norm,
checked on a quadratic whose smoothness is known; vectors ride along (a LayerNorm never steers
the distribution); ``smoothness_every``; resume bit for bit."""

import copy
import math

import pytest
import torch
from torch import nn

import dropmuon
from dropmuon.layers.smoothness import rms_dual_norm, rms_operator_norm


def whitened_inputs(n_in, n=512, seed=0):
    """Inputs X (n, n_in) with X^T X / n = I exactly."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n_in, generator=g, dtype=torch.float64))
    return (q * math.sqrt(n)).float()


def quadratic_estimate(model, x, target_fn, steps=6, **options):
    """Trains ``model`` on the quadratic 0.5 * mean over samples and outputs of the squared
    error to ``target_fn(x)`` (the RMS loss), every layer active, and returns the estimates."""
    options = dict(
        dict(lr=0.05, momentum=0.0, nesterov=False, smoothness_beta=0.0, smoothness_every=1),
        **options,
    )
    opt = dropmuon.DropMuon(model, sampling="full", estimate_smoothness=True, **options)
    target = target_fn(x)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (model(x) - target).pow(2).mean()).backward()
        opt.step()
    return opt.smoothness


@pytest.mark.parametrize("shape", [(16, 16), (16, 64), (8, 32)])
def test_a_matrix_layer_of_the_rms_quadratic_has_smoothness_one_whatever_its_shape(shape):
    # f(W) = 0.5 * mean ||(W - W*) x||^2 with whitened x: gradient (W - W*) / out, so in the
    # RMS->RMS norm (sqrt(in/out) ||.||_2, dual sqrt(out/in) ||.||_*) L = min(in, out) / in,
    # reached along an orthogonalized (spectral) step: 1 for in <= out. Measured in each
    # layer's own spectral norm (the estimator before the one-scale fix) it would be in / out:
    # 1, 1/4, 1/4.
    n_in, n_out = shape
    torch.manual_seed(0)
    model, star = nn.Linear(n_in, n_out, bias=False), nn.Linear(n_in, n_out, bias=False)
    x = whitened_inputs(n_in)
    (estimate,) = quadratic_estimate(
        model,
        x,
        lambda x: star(x).detach(),
        ns_coefficients="polar_express",
        ns_steps=10,
        ns_precision="native",
    )
    assert estimate == pytest.approx(1.0, rel=0.06)


@pytest.mark.parametrize("norm", ["spectral", "sign", "column", "row", "frobenius", "adamw"])
def test_every_update_norm_estimates_on_the_same_scale(norm):
    # The same quadratic (true L = 1) updated in each norm: the secant measures the curvature
    # along the step taken, so it can be below L but never above it, and never zero here.
    torch.manual_seed(0)
    model, star = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False)
    x = whitened_inputs(16)
    (estimate,) = quadratic_estimate(
        model, x, lambda x: star(x).detach(), norms={"head": norm}, lr=0.01
    )
    assert 0.2 < estimate <= 1.02, (norm, estimate)


def test_a_1x1_convolution_and_the_linear_layer_it_equals_estimate_the_same():
    torch.manual_seed(0)
    linear, star = nn.Linear(12, 24, bias=False), nn.Linear(12, 24, bias=False)
    conv = nn.Conv2d(12, 24, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
    x = whitened_inputs(12)
    as_linear = quadratic_estimate(linear, x, lambda x: star(x).detach())

    class PerPixel(nn.Module):  # the conv on images of one pixel: the same function
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x[:, :, None, None])[:, :, 0, 0]

    as_conv = quadratic_estimate(PerPixel(), x, lambda x: star(x).detach())
    assert as_conv[0] == pytest.approx(as_linear[0], rel=1e-3)


def test_rms_norms_are_the_operator_norms_of_the_map():
    torch.manual_seed(0)
    w = torch.randn(24, 6)
    expected = math.sqrt(6 / 24) * float(torch.linalg.matrix_norm(w.double(), 2))
    assert rms_operator_norm(w, embedding=False) == pytest.approx(expected, rel=1e-6)
    # The nuclear norm is <w, sharp(w)> from 8 Polar Express steps, whose singular values end
    # within [0.97, 1.08] of 1: within 8%.
    nuclear = float(torch.linalg.matrix_norm(w.double(), "nuc"))
    assert rms_dual_norm(w, embedding=False) == pytest.approx(math.sqrt(24 / 6) * nuclear, rel=0.08)
    # An embedding table (rows: tokens) maps a token to its row: in = rows, out = dim.
    assert rms_operator_norm(w, embedding=True) == pytest.approx(expected * 24 / 6, rel=1e-6)
    # The definitions: for every x, ||W x||_rms <= ||W|| ||x||_rms, equality at the top vector.
    x = torch.linalg.svd(w.double()).Vh[0].float()
    rms = lambda t: float(t.double().pow(2).mean().sqrt())  # noqa: E731
    assert rms(w @ x) / rms(x) == pytest.approx(rms_operator_norm(w, embedding=False), rel=1e-4)


def pre_ln_transformer(seed=0, vocab=16, d=32, context=8):
    torch.manual_seed(seed)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, norm_first=True,
                                               batch_first=True)  # fmt: skip
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

        def forward(self, tokens):
            h = self.encoder(self.embed(tokens), mask=self.mask, is_causal=True)
            return self.head(self.norm(h))

    return Model()


def lm_step(model, opt, g, vocab=16, context=8):
    tokens = torch.randint(0, vocab, (16, context + 1), generator=g)
    opt.zero_grad()
    logits = model(tokens[:, :-1])
    nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()
    opt.step()


def test_norm_layers_do_not_steer_cost_optimal_on_a_pre_ln_transformer():
    model = pre_ln_transformer()
    opt = dropmuon.DropMuon(model, lr=0.02, sampling="cost_optimal", seed=0)
    g = torch.Generator().manual_seed(0)
    cutoffs = []
    for _ in range(40):
        cutoffs.append(opt.cutoff)
        lm_step(model, opt, g)
    names = opt.layer_names()
    norm_layers = [i for i, n in enumerate(names) if "norm" in n]
    assert len(norm_layers) == 5  # two per block and the final one
    estimates = opt.smoothness
    assert all(estimates[i] is None for i in norm_layers)  # vectors ride along
    assert all(v is not None and v > 0 for i, v in enumerate(estimates) if i not in norm_layers)
    p = opt.cutoff_probabilities
    assert sum(p[i] for i in norm_layers) == 0.0  # a norm layer never raises the running maximum
    assert not set(cutoffs[1:]) & set(norm_layers)
    # describe() shows the distribution the next draw uses and the estimates ("-": none).
    rows = dropmuon.describe(opt).splitlines()[2:]
    assert [float(r.split()[4]) for r in rows] == pytest.approx(p, abs=1e-3)
    assert all(rows[i].split()[5] == "-" for i in norm_layers)
    assert len(set(cutoffs[1:])) >= 2  # a distribution, not full updates with extra cost


def test_smoothness_every_refreshes_on_every_kth_active_step_and_keeps_no_gradient_between():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = dropmuon.DropMuon(
        model, lr=0.02, sampling="full", estimate_smoothness=True, smoothness_every=3
    )
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    history = []
    for _ in range(9):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        kept = [p for p in model.parameters() if "prev_grad" in opt.state[p]]
        history.append((list(opt.smoothness), len(kept)))
    # Armed at active steps 2, 5, 8 (0-based): the gradients of the two matrices kept (biases
    # ride along), taken and freed at steps 3, 6.
    assert [kept for _, kept in history] == [0, 0, 2, 0, 0, 2, 0, 0, 2]
    first = [v for v, _ in history]
    assert first[2] == [None, None] and first[3][0] is not None
    assert first[3] == first[4] == first[5] and first[6] != first[5]


@pytest.mark.parametrize("layers", ["modules", "blocks"])
def test_cost_optimal_resumes_bit_for_bit_with_sparse_estimates(layers):
    options = dict(lr=0.02, sampling="cost_optimal", smoothness_every=2, seed=5, layers=layers)
    model = pre_ln_transformer()
    opt = dropmuon.DropMuon(model, **options)
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        lm_step(model, opt, g)
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), g.get_state()
    for _ in range(6):
        lm_step(model, opt, g)

    resumed = pre_ln_transformer()
    resumed.load_state_dict(saved[0])
    opt2 = dropmuon.DropMuon(resumed, **options)
    opt2.load_state_dict(saved[1])
    g2 = torch.Generator()
    g2.set_state(saved[2])
    for _ in range(6):
        lm_step(resumed, opt2, g2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt2.smoothness == opt.smoothness
    assert opt2.update_counts == opt.update_counts


@pytest.mark.parametrize(
    "value, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_bad_smoothness_every_is_refused(value, error):
    with pytest.raises(error, match="smoothness_every"):
        dropmuon.DropMuon(nn.Linear(2, 2), smoothness_every=value)


def test_estimates_of_a_checkpoint_written_on_the_old_scale_are_made_again():
    model = pre_ln_transformer()
    opt = dropmuon.DropMuon(model, lr=0.02, sampling="cost_optimal", smoothness_every=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        lm_step(model, opt, g)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["dropmuon"]["smoothness_scale"] == "rms-operator"
    again = dropmuon.DropMuon(model, lr=0.02, sampling="cost_optimal", smoothness_every=1)
    again.load_state_dict(copy.deepcopy(saved))
    assert again.smoothness == opt.smoothness and any(v is not None for v in again.smoothness)

    old = copy.deepcopy(saved)
    del old["param_groups"][0]["dropmuon"]["smoothness_scale"]  # as written before the fix
    older = dropmuon.DropMuon(model, lr=0.02, sampling="cost_optimal", smoothness_every=1)
    older.load_state_dict(old)
    assert older.smoothness == [None] * older.num_layers
    assert older.cutoff_probabilities[0] == 1.0  # full updates until new estimates exist
    assert older.update_counts == opt.update_counts  # the rest of the checkpoint is loaded


def test_cutoff_probabilities_are_the_samplers_and_none_for_a_user_sampler():
    from dropin import FixedCutoff

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    assert dropmuon.DropMuon(model).cutoff_probabilities == pytest.approx([0.25] * 4)
    custom = dropmuon.DropMuon(model, sampling=[0.1, 0.2, 0.3, 0.4])
    assert custom.cutoff_probabilities == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert dropmuon.DropMuon(model, sampling=FixedCutoff(2)).cutoff_probabilities is None


def test_a_layer_the_user_froze_does_not_hold_cost_optimal_at_full_updates():
    model = pre_ln_transformer()
    model.embed.weight.requires_grad_(False)  # frozen embeddings: never estimated
    opt = dropmuon.DropMuon(model, lr=0.02, sampling="cost_optimal", smoothness_every=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        lm_step(model, opt, g)
    assert opt.smoothness[0] is None
    assert opt.cutoff_probabilities[0] < 1.0  # drawn from the other layers' estimates
