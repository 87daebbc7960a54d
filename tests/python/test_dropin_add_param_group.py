"""Issue 22, finding 7: add_param_group works as in torch.optim (fine-tuning: parameters
unfrozen later), for Muon and DropMuon; the new parameters join a layer or make one, the sampler
follows, and a refused group changes nothing."""

import copy

import pytest
import torch
from dropin import cnn, cnn_loss, step
from torch import nn

import dropmuon


def test_muon_add_param_group_trains_the_new_parameters():
    model = cnn()
    head = list(model[5].parameters())
    opt = dropmuon.Muon(head, lr=0.05)
    body = list(model[0].parameters()) + list(model[2].parameters())
    start = [p.detach().clone() for p in body]
    opt.add_param_group({"params": body, "lr": 0.02})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.02
    step(model, opt, cnn_loss, 0)
    assert opt.layer_names() == ["0", "2", "5"]  # the model's modules, found at the forward
    assert all(not torch.equal(a, b) for a, b in zip(body, start))


def test_gradual_unfreezing_of_a_module_built_dropmuon():
    """ULMFiT-style: the body frozen at first; later unfrozen and added. Its modules become
    layers, placed by the next forward (traced again), and the sampler covers them."""
    model = cnn()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = dropmuon.DropMuon(model, lr=0.05, seed=1)
    assert opt.num_layers == 2
    for s in range(3):
        step(model, opt, cnn_loss, s)
    counts = dict(zip(opt.layer_names(), opt.update_counts))
    for p in model[0].parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.01})
    assert opt.num_layers == 3 and opt.sampler.num_layers == 3
    assert opt.param_groups[1]["param_names"] == ["0.weight", "0.bias"]
    start = model[0].weight.detach().clone()
    for s in range(3, 20):
        step(model, opt, cnn_loss, s)
    assert opt.layer_names() == ["0", "2", "5"]  # the first conv runs first
    assert opt.layer_order == "first forward"
    assert opt.update_counts[0] > 0 and not torch.equal(model[0].weight, start)
    assert opt.update_counts[1] >= counts["2"] and opt.update_counts[2] == counts["5"] + 17
    state = copy.deepcopy(opt.state_dict())  # a checkpoint of the grown optimizer loads
    opt.load_state_dict(state)


def test_keyed_groups_join_or_make_layers():
    model = cnn()
    opt = dropmuon.DropMuon(
        [
            {"params": [model[0].weight], "layer": 0},
            {"params": [model[5].weight, model[5].bias], "layer": 10},
        ],
        lr=0.02,
    )
    opt.add_param_group({"params": [model[0].bias], "layer": 0})  # joins layer 0
    assert opt.num_layers == 2 and opt.layer_of(model[0].bias) == 0
    opt.add_param_group({"params": list(model[2].parameters()), "layer": 5})  # a new middle one
    assert opt.layer_names() == ["layer 0", "layer 5", "layer 10"]
    assert opt.layer_of(model[2].weight) == 1 and opt.layer_of(model[5].weight) == 2
    for s in range(4):
        step(model, opt, cnn_loss, s)


def test_unkeyed_groups_are_split_by_use_before_and_after_the_first_forward():
    """Groups without "layer" keys are hyperparameters: before the first forward a new one
    waits with the others; after it, its modules become layers placed by the next forward."""
    model = cnn()
    opt = dropmuon.DropMuon([{"params": list(model[2].parameters())}], lr=0.02)
    opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.01})
    assert opt.num_layers == 1 and opt.layer_order.startswith("pending")
    step(model, opt, cnn_loss, 0)
    assert opt.layer_names() == ["0", "2"] and opt.layer_order == "first forward"
    opt.add_param_group({"params": list(model[5].parameters())})
    assert opt.layer_names() == ["0", "2", "5"] and opt.layer_order.startswith("registration")
    step(model, opt, cnn_loss, 1)
    assert opt.layer_names() == ["0", "2", "5"] and opt.layer_order == "first forward"


@pytest.mark.parametrize(
    "build, group, message",
    [
        (
            lambda m: dropmuon.DropMuon(m, sampling=[0.5, 0.5, 0.0]),
            lambda m: {"params": [nn.Parameter(torch.zeros(3))]},
            "sampling='custom' has one probability per layer",
        ),
        (
            lambda m: dropmuon.DropMuon(m),
            lambda m: {"params": [nn.Parameter(torch.zeros(3))]},
            "not the model's",
        ),
        (
            lambda m: dropmuon.DropMuon(list(m[0].parameters())),
            lambda m: {"params": list(m[2].parameters()), "lr": -1.0},
            "Learning rate should be >= 0",
        ),
        (
            lambda m: dropmuon.DropMuon(list(m[0].parameters())),
            lambda m: {"params": [m[0].weight]},
            "some parameters appear in more than one parameter group",
        ),
        (
            lambda m: dropmuon.DropMuon(list(m[0].parameters())),
            lambda m: {"params": [m[2].weight], "layer": 3},
            "either every param group has a 'layer' index or none does",
        ),
        (
            lambda m: dropmuon.DropMuon(list(m[0].parameters())),
            lambda m: {"params": [torch.zeros(2, 2, dtype=torch.complex64)]},
            "complex parameters",
        ),
    ],
)
def test_a_refused_group_changes_nothing(build, group, message):
    model = cnn()
    opt = build(model)
    before = (len(opt.param_groups), opt.num_layers, opt.state_dict()["param_groups"])
    with pytest.raises((ValueError, TypeError), match=message):
        opt.add_param_group(group(model))
    assert (len(opt.param_groups), opt.num_layers, opt.state_dict()["param_groups"]) == before


def test_muon_built_on_a_model_orders_added_layers_by_the_next_forward():
    """Muon stops watching forwards once its layers are ordered; adding a group starts again."""
    model = cnn()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = dropmuon.Muon(model, lr=0.02)
    for s in range(2):
        step(model, opt, cnn_loss, s)
    for p in model[0].parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": list(model[0].parameters())})
    step(model, opt, cnn_loss, 2)
    assert opt.layer_names() == ["0", "2", "5"] and opt.layer_order == "first forward"
    assert opt.update_counts == [1, 3, 3]


def test_a_float16_matrix_is_refused_as_at_construction():
    model = cnn()
    opt = dropmuon.DropMuon(list(model[0].parameters()))
    with pytest.raises(ValueError, match="float16"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 3, dtype=torch.float16))]})
    assert len(opt.param_groups) == 1


def test_a_checkpoint_written_while_new_layers_wait_for_their_trace_resumes():
    """Saved after add_param_group (the new layer not yet placed by a forward) and loaded into
    a twin built the same way: the same layers, statistics and trajectory."""

    class Reversed(nn.Module):  # registered a, b, c; run c, b, a
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.c = nn.Linear(6, 3), nn.Linear(6, 6), nn.Linear(4, 6)
            self.extra = nn.Linear(4, 4)
            for p in self.extra.parameters():
                p.requires_grad_(False)

        def forward(self, x):
            return self.a(torch.tanh(self.b(torch.tanh(self.c(self.extra(x))))))

    def loss(model, s):
        g = torch.Generator().manual_seed(s)
        return model(torch.randn(5, 4, generator=g)).square().mean()

    def build():
        model = Reversed()
        return model, dropmuon.DropMuon(model, lr=0.02, seed=2, sampling="uniform")

    def grow(model, opt):
        for p in model.extra.parameters():
            p.requires_grad_(True)
        opt.add_param_group({"params": list(model.extra.parameters())})

    model, opt = build()
    for s in range(4):
        step(model, opt, loss, s)
    grow(model, opt)
    state = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)  # the same weights, built the same way: extra frozen, then grown
    for p in twin.extra.parameters():
        p.requires_grad_(False)
    twin_opt = dropmuon.DropMuon(twin, lr=0.02, seed=2, sampling="uniform")
    grow(twin, twin_opt)
    twin_opt.load_state_dict(state)
    for s in range(4, 10):
        step(model, opt, loss, s)
        step(twin, twin_opt, loss, s)
    assert opt.layer_names() == twin_opt.layer_names() == ["extra", "c", "b", "a"]
    assert opt.update_counts == twin_opt.update_counts
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
