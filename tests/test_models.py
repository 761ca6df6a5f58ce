"""Reference networks (Miconi 2021; Journe et al. 2023): architecture as published, recipe usable
through attach + a stock optimizer, bit-for-bit reproducible training, exact save/load."""

import pytest
import torch
from torch import nn

import hebbloss.models as models
from hebbloss.competition import SoftWTA
from hebbloss.models.miconi2021 import HomeostaticTriangle, Winners


def train(model, steps, batch, seed):
    plastic = model.recipe.attach(model)
    opt = model.recipe.optimizer(plastic)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(batch, generator=g))
        plastic.loss().backward()
        opt.step()
    return plastic


def test_miconi2021_architecture_real_sizes():
    model = models.create("miconi2021")
    shapes = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
             for n in model.feature_layers]
    model(torch.randn(2, 3, 32, 32))
    assert shapes == {"pool1": (2, 100, 14, 14), "pool2": (2, 196, 6, 6), "pool3": (2, 400, 2, 2)}
    for h in hooks:
        h.remove()
    for name, k, amount in (("conv1", 5, 0.0), ("conv2", 3, 0.99), ("conv3", 3, 0.99)):
        conv = getattr(model, name)
        assert conv.kernel_size == (k, k) and conv.padding == (0, 0) and conv.bias is None
        w = conv.weight_orig * conv.weight_mask if amount else conv.weight
        if amount:
            assert int((conv.weight_mask == 0).sum()) == round(amount * conv.weight_mask.numel())
        assert torch.allclose(w.detach().flatten(1).norm(dim=1), torch.ones(w.shape[0]), atol=1e-5)
    assert isinstance(model.act1, HomeostaticTriangle) and isinstance(model.pool1, nn.AvgPool2d)
    assert [getattr(model, f"act{i}").theta.numel() for i in (1, 2, 3)] == [100, 196, 400]
    recipe = model.recipe
    assert [l.rule for l in recipe.layers.values()] == ["instar"] * 3
    assert all(isinstance(l.post, Winners) and l.post.act is getattr(model, f"act{i}")
               for i, l in enumerate(recipe.layers.values(), start=1))
    assert all(a.k == 1 and a.homeostasis == 3.0 and a.triangle for a in (model.act1, model.act2, model.act3))
    assert (recipe.batch_size, recipe.epochs, recipe.renormalize, recipe.warmup_steps) == (100, 20, True, 200)


def test_miconi2021_ablations():
    plain = models.miconi2021(triangle=False, pruning=False, channels=(6, 8, 10))
    assert not plain.act2.triangle
    assert not hasattr(plain.conv2, "weight_orig")
    out = plain(torch.randn(2, 3, 32, 32))
    assert set(out.unique().tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0}  # avg-pooled binary winners
    with pytest.raises(ValueError, match="k=7"):
        models.miconi2021(k=7, channels=(6, 8, 10))


def test_miconi2021_recipe_step_keeps_unit_norm_and_zeros():
    model = models.miconi2021(channels=(8, 12, 16))
    plastic = train(model, 2, (4, 3, 32, 32), seed=0)
    opt = model.recipe.optimizer(plastic)
    assert [g["lr"] for g in opt.param_groups] == [l.lr for l in model.recipe.layers.values()]
    for name in ("conv2", "conv3"):
        conv = getattr(model, name)
        w = (conv.weight_orig * conv.weight_mask).detach()
        assert torch.all(w[conv.weight_mask == 0] == 0)
        alive = conv.weight_mask.flatten(1).any(dim=1)  # at 99% pruning a tiny filter may lose every input
        assert torch.allclose(w.flatten(1).norm(dim=1)[alive], torch.ones(int(alive.sum())), atol=1e-5)
    assert model.act1.theta.abs().sum() > 0  # homeostasis ran in training mode
    assert list(plastic.state_dict()) == []  # the thresholds are the model's, not copies in the handle
    plastic.remove()


def test_miconi2021_one_step_against_a_float64_reference_of_the_papers_code():
    """One batch as the paper's code computes it: with thresholds theta, the plastic signal is the
    binarised 1-WTA of z - theta, the forward output Triangle(z - theta) = relu(u - mean_c u) with
    u = z - theta, then theta += mu * (win rate - 1/C); all with the theta from before the batch."""
    torch.manual_seed(0)
    model = models.miconi2021(channels=(5, 6, 7), pruning=False).double()
    theta0 = torch.randn(5, dtype=torch.float64) * 0.1
    model.act1.theta.copy_(theta0)
    seen = {}
    conv1 = model.recipe.layers["conv1"]
    winners = conv1.post  # a plain callable, used as is: wrap it to see the plastic signal it gives
    conv1.post = lambda z: seen.setdefault("post", winners(z))
    plastic = model.recipe.attach(model)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    model.act1.register_forward_hook(lambda m, a, o: seen.update(act=o.detach().clone()))
    model(x)

    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)  # population variance (see Standardize)
    xs = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / (var + 1e-8).sqrt()
    z = torch.nn.functional.conv2d(xs, model.conv1.weight.detach())
    u = z - theta0.view(1, -1, 1, 1)
    winner = u.argmax(dim=1, keepdim=True)
    mask = torch.zeros_like(u).scatter_(1, winner, 1.0)
    expected_out = (u - u.mean(dim=1, keepdim=True)).clamp(min=0)
    expected_theta = theta0 + 3.0 * (mask.mean(dim=(0, 2, 3)) - 1 / 5)

    torch.testing.assert_close(seen["post"], mask)
    torch.testing.assert_close(seen["act"], expected_out)
    torch.testing.assert_close(model.act1.theta, expected_theta)
    plastic.remove()


def test_softhebb_cifar10_architecture_real_sizes():
    model = models.create("softhebb", dataset="cifar10")
    expected = [(3, 96, 5, 2, 0.7, nn.MaxPool2d, 1.0, 0.08), (96, 384, 3, 1, 1.4, nn.MaxPool2d, 0.65, 0.005),
                (384, 1536, 3, 1, 1.0, nn.AvgPool2d, 0.25, 0.01)]
    for i, (cin, cout, k, pad, power, pool, beta, lr) in enumerate(expected, start=1):
        bn, conv, act = getattr(model, f"bn{i}"), getattr(model, f"conv{i}"), getattr(model, f"act{i}")
        assert bn.num_features == cin and not bn.affine
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (cin, cout, (k, k), (pad, pad))
        assert conv.padding_mode == "reflect" and conv.bias is None
        assert act.power == power and isinstance(getattr(model, f"pool{i}"), pool)
        layer = model.recipe.layers[f"conv{i}"]
        assert layer.rule == "softhebb" and isinstance(layer.post, SoftWTA)
        assert layer.post.inverse_temperature == beta and layer.post.anti_hebbian and layer.lr == lr
    assert abs(float(model.conv2.weight.detach().flatten(1).norm(dim=1).mean()) - 25.0) < 1.0
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1536, 4, 4)
    assert (model.recipe.batch_size, model.recipe.epochs, model.recipe.softhebb_power) == (10, 1, 0.5)


@pytest.mark.parametrize("make", [
    lambda g: torch.randn(3, 5, 9, 8, generator=g, dtype=torch.float64),
    lambda g: torch.randint(-2, 3, (3, 5, 9, 8), generator=g).double(),  # ties: the gradient goes to the first
    lambda g: torch.randn(3, 5, 9, 8, generator=g).contiguous(memory_format=torch.channels_last),
])
@pytest.mark.parametrize("kernel, stride, padding", [(4, 2, 1), (3, 2, 0), (2, 2, 0)])
def test_blocks_max_pool_equals_torchs_in_values_gradient_and_layout(make, kernel, stride, padding):
    """The reference networks' MaxPool2d (channels-last on the CPU) against torch's own nn.MaxPool2d."""
    from hebbloss.models.blocks import MaxPool2d
    x = make(torch.Generator().manual_seed(0))
    weights = torch.randn(nn.MaxPool2d(kernel, stride, padding)(x).shape, generator=torch.Generator().manual_seed(1),
                          dtype=x.dtype)
    outs, grads = [], []
    for pool in (MaxPool2d(kernel, stride, padding), nn.MaxPool2d(kernel, stride, padding)):
        leaf = x.clone().requires_grad_(True)
        out = pool(leaf)
        (out * weights).sum().backward()
        outs.append(out)
        grads.append(leaf.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert outs[0].is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    assert outs[0].is_contiguous() == x.is_contiguous()


def test_softhebb_variants():
    mnist = models.softhebb("mnist", channels=(4, 6, 8))
    assert mnist.bn1.num_features == 1 and mnist(torch.randn(2, 1, 28, 28)).shape == (2, 8, 3, 3)
    stl = models.softhebb("stl10", channels=(4, 6, 8, 10))
    assert stl.num_blocks == 4 and stl(torch.randn(2, 3, 96, 96)).shape == (2, 10, 6, 6)
    assert [l.post.inverse_temperature for l in stl.recipe.layers.values()] == [1.0, 0.65, 0.45, 0.25]
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        models.softhebb("svhn")
    with pytest.raises(ValueError, match="3 positive ints"):
        models.softhebb("cifar10", channels=(4, 6))


@pytest.mark.parametrize("name,kwargs,shape", [
    ("miconi2021", {"channels": (8, 12, 16)}, (4, 3, 32, 32)),
    ("softhebb", {"channels": (6, 8, 10)}, (4, 3, 32, 32)),
])
def test_training_is_bit_for_bit_reproducible_and_round_trips(name, kwargs, shape):
    runs = []
    for _ in range(2):
        model = models.create(name, seed=3, **kwargs)
        plastic = train(model, 3, shape, seed=7)
        runs.append((model, plastic))
    (m1, p1), (m2, p2) = runs
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(torch.equal(v, p2.state_dict()[k]) for k, v in p1.state_dict().items())
    start = models.create(name, seed=3, **kwargs).state_dict()
    assert any(not torch.equal(start[k], s1[k]) for k in s1 if k.endswith(("weight", "weight_orig")))
    other = models.create(name, seed=11, **kwargs)  # different init and masks, replaced by the load
    other.load_state_dict(s1)
    other_plastic = other.recipe.attach(other)
    other_plastic.load_state_dict(p1.state_dict())
    x = torch.randn(shape)
    m1.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(m1(x), other(x))
    for p in (p1, p2, other_plastic):
        p.remove()


def test_registry():
    assert models.available() == ["amit2019", "miconi2021", "softhebb"]
    assert models.with_recipe() == ["miconi2021", "softhebb"]
    assert all(hasattr(models.create(n, **({"channels": (4, 4, 4)} if n == "softhebb" else {"channels": (4, 4, 4), "pruning": False})), "recipe") for n in models.with_recipe())
    with pytest.raises(ValueError, match="available: amit2019, miconi2021, softhebb"):
        models.create("resnet")
    assert models.create("miconi2021", channels=(4, 4, 4)).recipe.to_dict()["layers"]["conv2"]["rule"] == "instar"


def _theta_after(theta0, z, mu=3.0):
    """theta + mu * (win rate - 1/C) for the 1-WTA of z - theta, written out in float64."""
    u = z - theta0.view(1, -1, 1, 1)
    mask = torch.zeros_like(u).scatter_(1, u.argmax(dim=1, keepdim=True), 1.0)
    return theta0 + mu * (mask.mean(dim=(0, 2, 3)) - 1 / z.shape[1])


@pytest.mark.parametrize("change", ["none", "z written to", "theta moved", "another z", "eval then train"])
def test_miconi2021_forward_reuses_the_winners_of_the_post_signal_only_for_the_same_z_and_theta(change, monkeypatch):
    import sys

    miconi = sys.modules[HomeostaticTriangle.__module__]  # hebbloss.models.miconi2021 names the builder
    calls = []
    real = miconi.kwta_winners
    monkeypatch.setattr(miconi, "kwta_winners", lambda *a, **k: calls.append(1) or real(*a, **k))
    act = HomeostaticTriangle(4, k=1, homeostasis=3.0).double()
    g = torch.Generator().manual_seed(0)
    act.theta.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    z = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    act.winners(z.detach())  # as attach's hook calls it, on the detached output
    if change == "z written to":
        z.mul_(-1)  # every winner changes
    elif change == "theta moved":
        act.theta.mul_(-5)
    elif change == "another z":
        z = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    elif change == "eval then train":
        act.eval()
        act(z)  # no thresholds move in eval mode; the stash goes
        act.train()
    theta0 = act.theta.clone()
    act(z)
    torch.testing.assert_close(act.theta, _theta_after(theta0, z), rtol=0, atol=1e-12)
    assert calls == [1] if change == "none" else calls == [1, 1]
    assert act._found is None  # nothing held past the forward
