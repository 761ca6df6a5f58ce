"""The reference recipes' pieces taken from the authors' code: Miconi 2021's flips and ZCA, SoftHebb's
per-depth and per-dataset presets (NeuromorphicComputing/SoftHebb presets.json), as plain data."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hebbloss import models
from hebbloss.cli.preprocess import Preprocess
from hebbloss.data.augment import augment, flip_mask, hflip
from hebbloss.models.recipe import Recipe
from hebbloss.zca import MICONI2021, ZCA, fit_zca

D = torch.float64


# ---------------------------------------------------------------- flips

def plain_flip(x, which):
    """Reference: sample i mirrored by reversing its last axis with an explicit index list."""
    w = x.shape[-1]
    rev = torch.tensor(list(range(w - 1, -1, -1)))
    return torch.stack([x[i].index_select(-1, rev) if which[i] else x[i] for i in range(x.shape[0])])


def test_hflip_flips_exactly_the_chosen_samples():
    x = torch.randn(6, 3, 4, 5, dtype=D)
    which = [True, False, True, False, False, True]
    before = x.clone()
    out = hflip(x, torch.tensor(which))
    assert torch.equal(out, plain_flip(x, which)) and torch.equal(x, before)
    assert torch.equal(out[1], x[1]) and not torch.equal(out[0], x[0])
    img = torch.randint(0, 256, (4, 1, 3, 3), dtype=torch.uint8)  # the CLI flips uint8 batches
    assert torch.equal(hflip(img, torch.tensor([False, True, True, False])), plain_flip(img, [False, True, True, False]))


def test_random_flips_are_reproducible_from_the_generator():
    x = torch.randn(64, 3, 2, 4, dtype=D)
    drawn = torch.rand(64, generator=torch.Generator().manual_seed(5)) < 0.5  # the documented draw
    a = augment("hflip", x, torch.Generator().manual_seed(5))
    b = hflip(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, plain_flip(x, drawn.tolist())) and torch.equal(a, b)
    assert torch.equal(flip_mask(64, torch.Generator().manual_seed(5)), drawn)
    assert 10 < int(drawn.sum()) < 54
    assert not torch.equal(a, augment("hflip", x, torch.Generator().manual_seed(6)))
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert augment(None, x, g) is x and torch.equal(g.get_state(), state)  # no augmentation draws nothing


def test_unknown_augmentation_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown augmentation 'vflip'; choose None or one of hflip"):
        augment("vflip", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="recipe r: unknown augmentation 'crop'"):
        Recipe("r", {}, 1, 1, augment="crop")
    with pytest.raises(ValueError, match="mask must be 3 booleans"):
        hflip(torch.zeros(3, 2), torch.tensor([1, 0, 1]))


# ---------------------------------------------------------------- Miconi's ZCA

def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(12, 12, generator=g, dtype=D)
    offset = torch.linspace(-2, 3, 12, dtype=D)  # per-pixel means, which his ZCA does not remove
    return (torch.randn(n, 12, generator=g, dtype=D) @ mix + offset).reshape(n, 3, 2, 2)


def miconi_reference(fit_set, x, eps=1e-3):
    """His code (HebbGrad_Github.ipynb, ZCA = 'IMAGE'), written plainly in float64."""
    t = fit_set.reshape(fit_set.shape[0], -1)
    t = t - torch.mean(t, axis=1, keepdims=True)
    t = t / (1e-10 + torch.std(t, axis=1, keepdims=True))
    covt = torch.matmul(t.T, t) / t.shape[1]
    covt += torch.diag(eps * torch.ones(covt.shape[0], dtype=D))
    eivals, eivects = torch.linalg.eigh(covt)
    zcamat = torch.matmul(torch.matmul(eivects, torch.diag(1.0 / torch.sqrt(eivals))), eivects.T)
    u = x.reshape(x.shape[0], -1)
    u = u - torch.mean(u, axis=1, keepdims=True)
    u = u / (1e-10 + torch.std(u, axis=1, keepdims=True))
    return zcamat, torch.matmul(zcamat, u.T).T.reshape(x.shape)


def test_miconi2021_zca_matches_his_computation():
    x, new = images(200), images(7, seed=1)
    zcamat, expected = miconi_reference(x, new)
    zca = ZCA.miconi2021().fit(x, eps=1e-3)
    torch.testing.assert_close(zca.matrix, zcamat, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(zca(new), expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(zca.mean, torch.zeros(3, 2, 2, dtype=D))
    default = ZCA().fit(x, eps=1e-3)  # ours: centred covariance / N: a different matrix
    assert not torch.allclose(default.matrix, zca.matrix, atol=1e-3)


def test_fit_zca_draws_his_flipped_subset_from_the_generator():
    x, new = images(30), images(3, seed=2)
    settings = {**MICONI2021, "fit_images": 20}
    g = torch.Generator().manual_seed(4)
    chosen = x[torch.randperm(30, generator=g)[:20]]
    flips = (torch.rand(20, generator=g) < 0.5).tolist()
    zcamat, expected = miconi_reference(plain_flip(chosen, flips), new)
    zca = fit_zca(x, settings, torch.Generator().manual_seed(4))
    torch.testing.assert_close(zca.matrix, zcamat, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(zca(new), expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match=r"ZCA settings \['epsilon'\] are unknown"):
        fit_zca(x, {"epsilon": 1e-3})


def test_preprocess_with_a_recipes_zca_settings_fits_and_reloads():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (40, 3, 2, 2), dtype=torch.uint8, generator=g)
    settings = {**MICONI2021, "fit_images": 30}
    prep = Preprocess(zca=settings).fit(raw, generator=torch.Generator().manual_seed(3))
    direct = fit_zca(raw.float() / 255.0, settings, torch.Generator().manual_seed(3))
    assert torch.equal(prep.zca.matrix, direct.matrix) and prep.zca.center is False
    again = Preprocess(zca=settings)
    again.load_state_dict(prep.state_dict())
    assert torch.equal(again(raw[:5]), prep(raw[:5])) and torch.equal(prep(raw[:5]), direct(raw[:5].float() / 255.0))


def test_miconi2021_recipe_declares_flips_and_his_zca():
    recipe = models.create("miconi2021", channels=(4, 4, 4)).recipe
    assert recipe.augment == "hflip" and recipe.zca == MICONI2021
    assert MICONI2021 == {"standardize": True, "center": False, "divisor": "features", "eps": 1e-3,
                          "fit_images": 9000, "fit_augment": "hflip"}
    data = json.loads(json.dumps(recipe.to_dict()))
    assert data["augment"] == "hflip" and data["zca"]["divisor"] == "features"
    copy = recipe.copy()
    copy.zca["eps"] = 1.0
    assert recipe.zca["eps"] == 1e-3


# ---------------------------------------------------------------- SoftHebb presets

def parse(preset, pool, activation):
    """The authors' block strings (presets.json), parsed plainly as their utils.generate_config does."""
    fields = {p[:2] if p[:2] in ("lr", "lp") else p[0]: p[2:] if p[:2] in ("lr", "lp") else p[1:] for p in preset.split("-")[1:]}
    kind, k, s, p = pool.split("_")
    power = float(activation.split("_")[1]) if "_" in activation else 1.0
    return dict(channels=int(fields["c"]), kernel=int(fields["k"]), padding=int(fields["p"]), beta=float(fields["t"]),
                lr=float(fields["lr"]), power_lr=float(fields.get("lp", 0.75)), pre=fields.get("e") == "1",
                pool=(kind, int(k), int(s), int(p)), power=power)


AUTHORS = {  # presets.json "model" entries, Hebbian blocks only
    ("cifar10", 1): [("softkrotov-c96-k5-p2-s1-d1-b0-t1-lr0.08-lp0.5-e0", "avg_4_2_1", "triangle_0.7")],
    ("cifar10", 2): [("softkrotov-c96-k5-p2-s1-d1-b0-t1-lr0.08-lp0.5-e0", "avg_4_2_1", "triangle_0.7"),
                     ("softkrotov-c384-k3-p1-s1-d1-b0-t0.65-lr0.005-lp0.5-e1", "max_4_2_1", "triangle_1.4")],
    ("cifar10", 3): [("softkrotov-c96-k5-p2-s1-d1-b0-t1-lr0.08-lp0.5-e0", "max_4_2_1", "triangle_0.7"),
                     ("softkrotov-c384-k3-p1-s1-d1-b0-t0.65-lr0.005-lp0.5-e0", "max_4_2_1", "triangle_1.4"),
                     ("softkrotov-c1536-k3-p1-s1-d1-b0-t0.25-lr0.01-lp0.5-e0", "avg_2_2_0", "triangle_1")],
    ("stl10", 4): [("softkrotov-c96-k5-p2-s1-d1-b0-t1-lr0.08-lp0.5-e0", "avg_4_2_1", "triangle_0.7"),
                   ("softkrotov-c384-k3-p1-s1-d1-b0-t0.65-lr0.005-lp0.5-e0", "max_4_2_1", "triangle_0.7"),
                   ("softkrotov-c1536-k3-p1-s1-d1-b0-t0.45-lr0.01-lp0.5-e0", "avg_4_2_1", "triangle_1.4"),
                   ("softkrotov-c6144-k3-p1-s1-d1-b0-t0.25-lr0.01-lp0.5-e0", "avg_2_2_0", "triangle")],
    ("imagenet", 5): [("softkrotov-c48-k5-p2-s1-d1-b0-t1.1-lr0.08", "max_4_2_1", "triangle_0.7"),
                      ("softkrotov-c192-k3-p1-s1-d1-b0-t0.7-lr0.01", "max_4_2_1", "triangle_0.7"),
                      ("softkrotov-c768-k3-p1-s1-d1-b0-t0.5-lr0.01", "max_4_2_1", "triangle_0.7"),
                      ("softkrotov-c3072-k3-p1-s1-d1-b0-t0.4-lr0.01", "max_4_2_1", "triangle_1.4"),
                      ("softkrotov-c12288-k3-p1-s1-d1-b0-t0.25-lr0.01", "avg_2_2_0", "triangle_1.0")],
}


@pytest.mark.parametrize("dataset,depth", sorted(AUTHORS))
def test_softhebb_blocks_are_the_authors_presets(dataset, depth):
    from hebbloss.models.softhebb import VARIANTS
    variant = VARIANTS[dataset]
    blocks = variant.depths[depth]
    expected = [parse(*b) for b in AUTHORS[(dataset, depth)]]
    assert len(blocks) == len(expected)
    for b, e in zip(blocks, expected):
        assert (b.channels, b.kernel, b.padding, b.inverse_temperature, b.lr, b.pool, b.power, b.pre_triangle) == \
               (e["channels"], e["kernel"], e["padding"], e["beta"], e["lr"], e["pool"], e["power"], e["pre"])
        assert variant.power_lr == e["power_lr"]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_softhebb_cifar10_depths_read_24576_features(depth):
    model = models.create("softhebb", depth=depth)
    readout = model.recipe.readout
    assert model.num_blocks == depth and readout["layer"] == f"pool{depth}" == model.feature_layers[-1]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.flatten(1).shape[1] == readout["features"] == 24576  # the issue's / paper's classifier input
    assert (model.recipe.batch_size, model.recipe.epochs, model.recipe.softhebb_power) == (10, 1, 0.5)
    assert (readout["dropout"], readout["optimizer"], readout["lr"], readout["batch_size"], readout["epochs"]) == \
           (0.5, "Adam", 1e-3, 64, 50)
    assert model.recipe.name == ("softhebb-cifar10" if depth == 3 else f"softhebb-cifar10-depth{depth}")
    json.dumps(model.recipe.to_dict())


def test_softhebb_depth2_pre_triangle_forward_and_post_against_a_plain_reference():
    model = models.create("softhebb", depth=2, channels=(5, 7)).double().eval()
    x = torch.randn(3, 3, 12, 12, dtype=D)

    def tri(u, p):
        v = u - u.mean(dim=1, keepdim=True)
        return torch.where(v > 0, v, torch.zeros_like(v)) ** p

    h = x / math.sqrt(1 + 1e-5)
    h = F.avg_pool2d(tri(F.conv2d(F.pad(h, (2,) * 4, mode="reflect"), model.conv1.weight), 0.7), 4, 2, 1,
                     count_include_pad=True)
    h = h / math.sqrt(1 + 1e-5)
    u = F.conv2d(F.pad(h, (1,) * 4, mode="reflect"), model.conv2.weight)
    expected = F.max_pool2d(tri(tri(u, 1.0), 1.4), 4, 2, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    post = model.recipe.layers["conv2"].post
    v = tri(u, 1.0).detach()
    soft = torch.softmax(0.65 * v, dim=1)
    winner = F.one_hot(v.argmax(dim=1), 7).permute(0, 3, 1, 2).bool()
    torch.testing.assert_close(post(u.detach()), torch.where(winner, soft, -soft))
    assert "pre_triangle" in model.recipe.notes


def test_softhebb_stl10_and_imagenet_recipes_build_attach_and_step():
    from hebbloss.models.softhebb import VARIANTS, make_recipe, pooled_size
    for dataset, depth, size, full, batch, power in [("stl10", 4, 96, 6144, 32, 0.5), ("stl10", 3, 96, 1536, 32, 0.5),
                                                      ("imagenet", 5, 160, 12288, 10, 0.75)]:
        widths = tuple(range(3, 3 + depth))
        model = models.create("softhebb", dataset=dataset, depth=depth, channels=widths)
        with torch.no_grad():
            side = model(torch.randn(2, 3, size, size)).shape[-1]
        assert side == pooled_size(size, VARIANTS[dataset].depths[depth])
        assert VARIANTS[dataset].depths[depth][-1].channels == full
        assert (model.recipe.batch_size, model.recipe.softhebb_power) == (batch, power)
        plastic = model.recipe.attach(model)
        opt = model.recipe.optimizer(plastic)
        before = model.conv1.weight.detach().clone()
        model(torch.rand(2, 3, size, size))
        opt.zero_grad()
        plastic.loss().backward()
        opt.step()
        assert not torch.equal(before, model.conv1.weight)
        plastic.remove()
        json.dumps(model.recipe.to_dict())
    full = {d: make_recipe(d, VARIANTS[d].depths[n], 3, n).readout for d, n in [("stl10", 4), ("imagenet", 5)]}
    assert (full["stl10"]["features"], full["stl10"]["epochs"], full["stl10"]["batch_size"]) == (6144 * 6 * 6, 100, 64)
    assert (full["imagenet"]["features"], full["imagenet"]["epochs"], full["imagenet"]["classes"]) == (12288 * 5 * 5, 200, 1000)
    with pytest.raises(ValueError, match="depth=3 has no preset for imagenet; choose one of 5"):
        models.create("softhebb", dataset="imagenet", depth=3)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_softhebb_mnist_variants_say_they_reuse_cifar10(dataset):
    model = models.create("softhebb", dataset=dataset, depth=1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).flatten(1).shape[1] == model.recipe.readout["features"] == 96 * 14 * 14
    assert "no SoftHebb CNN preset for MNIST" in model.recipe.notes["mnist"]
