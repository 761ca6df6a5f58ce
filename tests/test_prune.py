"""hebbloss.prune: fixed random masks (Miconi 2021) on torch.nn.utils.prune - pruned weights stay
exactly zero through any optimizer and a state_dict round trip."""
import io

import pytest
import torch
from torch import nn

import hebbloss
from hebbloss import prune


def effective(module):
    return module.weight_orig * module.weight_mask


def test_random_connections_prunes_exact_fraction_from_seed():
    a = prune.random_connections(nn.Conv2d(4, 10, 3), 0.9, seed=5)
    b = prune.random_connections(nn.Conv2d(4, 10, 3), 0.9, seed=5)
    c = prune.random_connections(nn.Conv2d(4, 10, 3), 0.9, seed=6)
    n = 10 * 4 * 9
    assert int((a.weight_mask == 0).sum()) == round(0.9 * n)
    assert torch.equal(a.weight_mask, b.weight_mask) and not torch.equal(a.weight_mask, c.weight_mask)
    assert set(a.state_dict()) == {"weight_orig", "weight_mask", "bias"}


def test_random_channel_pairs_removes_whole_kernels():
    conv = prune.random_channel_pairs(nn.Conv2d(6, 8, 3), 0.5, seed=1)
    mask = conv.weight_mask
    per_pair = mask.flatten(2)
    assert torch.equal(per_pair.amin(dim=2), per_pair.amax(dim=2))  # constant over each kernel
    assert int((per_pair[:, :, 0] == 0).sum()) == round(0.5 * 48)


def test_pruning_twice_keeps_earlier_zeros():
    conv = prune.random_connections(nn.Conv2d(3, 5, 3), 0.5, seed=0)
    first = conv.weight_mask.clone()
    prune.random_channel_pairs(conv, 0.4, seed=1)
    assert torch.all(conv.weight_mask <= first)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.1),
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5),
])
def test_pruned_weights_stay_zero_through_optimizer_steps_and_round_trip(make_opt):
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
    prune.random_connections(model[0], 0.7, seed=0)
    prune.random_channel_pairs(model[2], 0.5, seed=1)
    plastic = hebbloss.attach(model, rule="oja")
    opt = make_opt(plastic.plastic_parameters())
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(2, 3, 7, 7))
        plastic.loss().backward()
        opt.step()
    model(torch.randn(1, 3, 7, 7))
    for layer in (model[0], model[2]):
        dead = layer.weight_mask == 0
        assert torch.all(effective(layer)[dead] == 0) and torch.all(layer.weight[dead] == 0)
        assert torch.any(layer.weight_orig[dead] != 0)  # the optimizer did touch weight_orig
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
    prune.random_connections(fresh[0], 0.7, seed=99)
    prune.random_channel_pairs(fresh[2], 0.5, seed=98)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(1, 3, 7, 7)
    assert torch.equal(fresh(x), model(x))
    for old, new in ((model[0], fresh[0]), (model[2], fresh[2])):
        assert torch.equal(old.weight_mask, new.weight_mask)
        assert torch.all(new.weight[new.weight_mask == 0] == 0)
    plastic.remove()


def test_renormalize_filters_unit_norm_keeps_zeros():
    conv = prune.random_connections(nn.Conv2d(3, 5, 3), 0.6, seed=2)
    with torch.no_grad():
        conv.weight_orig.mul_(7.0)
    prune.renormalize_filters(conv)
    w = effective(conv).detach().double()
    for c in range(5):
        assert abs(float(torch.sqrt((w[c] ** 2).sum())) - 1.0) < 1e-6
    assert torch.all(w[conv.weight_mask == 0] == 0)


def test_renormalize_transposed_units():
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    prune.renormalize_filters(conv, norm=2.0)
    w = conv.weight.detach().double()  # [in, out/groups, k, k]; unit o of group g gathers rows of group g
    for g in range(2):
        for o in range(3):
            unit = w[g * 2:(g + 1) * 2, o]
            assert abs(float(torch.sqrt((unit ** 2).sum())) - 2.0) < 1e-6


def test_renormalize_after_step_hook():
    lin = nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    handle = prune.renormalize_after_step(opt, [lin])
    lin(torch.randn(2, 4)).sum().mul(10).backward()
    opt.step()
    assert torch.allclose(lin.weight.detach().norm(dim=1), torch.ones(3))
    handle.remove()
    opt.step()
    assert not torch.allclose(lin.weight.detach().norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5, "0.5", True, float("nan")])
def test_bad_amount_is_refused_and_changes_nothing(amount):
    conv = nn.Conv2d(2, 3, 3)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    with pytest.raises(ValueError, match=r"amount must be a fraction in \[0, 1\)"):
        prune.random_connections(conv, amount)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune.random_channel_pairs(conv, amount)
    assert set(conv.state_dict()) == set(before) and not hasattr(conv, "weight_orig")


def test_missing_parameter_named():
    with pytest.raises(ValueError, match="no parameter 'kernel'"):
        prune.random_connections(nn.Conv2d(2, 3, 3), 0.5, name="kernel")
    with pytest.raises(ValueError, match="channel pairs need"):
        prune.random_channel_pairs(nn.Conv2d(2, 3, 3), 0.5, name="bias")


def test_renormalize_leaves_a_fully_pruned_filter_at_zero_and_finite():
    conv = nn.Conv2d(2, 3, 3)
    torch.nn.utils.prune.custom_from_mask(conv, "weight", torch.ones_like(conv.weight))
    conv.weight_mask[1].zero_()  # unit 1 lost every connection
    for _ in range(5):  # the old 1/eps factor (1e10 per step) overflowed float32 here
        hebbloss.prune.renormalize_filters(conv)
    w = (conv.weight_orig * conv.weight_mask).detach().double()
    norms = w.flatten(1).norm(dim=1)
    assert torch.isfinite(conv.weight_orig).all()
    assert norms[1] == 0
    assert torch.allclose(norms[[0, 2]], torch.ones(2, dtype=torch.float64), atol=1e-6)
