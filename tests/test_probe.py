"""Linear probes: pooling, feature capture (plain and timm models), ridge and logistic readouts, evaluate.

References are written plainly here in float64, never through hebbloss.probe.
"""
import json

import numpy as np
import pytest
import timm
import torch
from torch import nn

import hebbloss
from hebbloss.data import ImageDataset
from hebbloss.probe import RidgeAccumulator, capture_features, evaluate, fit_logistic, fit_ridge, pool_features
from hebbloss.probe.baselines import random_copy
from hebbloss.probe.ridge import RidgeStats, choose_alpha, ridge_solution, squared_error


def ref_pool(z, grid):
    """Average over a grid x grid split of the last two dims, loops in float64 (sizes divisible)."""
    n, c, h, w = z.shape
    out = np.zeros((n, c, grid, grid))
    for i in range(grid):
        for j in range(grid):
            out[:, :, i, j] = z[:, :, i * h // grid:(i + 1) * h // grid, j * w // grid:(j + 1) * w // grid].mean(axis=(2, 3))
    return out.reshape(n, -1)


def test_pooling_matches_reference():
    z = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    assert torch.allclose(pool_features(z, "quadrants"), torch.from_numpy(ref_pool(z.numpy(), 2)))
    assert torch.allclose(pool_features(z, 3), torch.from_numpy(ref_pool(z.numpy(), 3)))
    assert torch.allclose(pool_features(z, "global"), torch.from_numpy(ref_pool(z.numpy(), 1)))
    assert torch.equal(pool_features(z, "flatten"), z.reshape(3, -1))
    tokens = torch.randn(2, 5, 7)  # [N, T, D]: channels last
    assert torch.allclose(pool_features(tokens, "global", channel_dim=-1), tokens.mean(1))
    for bad in ("max", 0, (2, -1), 2.5):
        with pytest.raises(ValueError, match="pool="):
            pool_features(z, bad)


def small_net():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def test_capture_features_right_layers_mode_restored_hooks_removed():
    net = small_net()
    net.train()
    net[1].eval()  # mixed modes must come back as they were
    images = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8)
    plastic = hebbloss.attach(net, rule="oja", targets=["0"])
    hooks_before = [len(m._forward_hooks) for m in net.modules()]
    feats = capture_features(net, ["3", "6", "input"], images, batch_size=3)
    assert list(feats) == ["input", "3", "6"]
    with torch.no_grad():
        x = images.double() / 255
        ref = net.double().eval()
        h3 = ref[3](ref[2](ref[1](ref[0](x))))
        out = ref[6](ref[5](ref[4](h3)))
    net.float()
    assert torch.allclose(feats["3"].double(), torch.from_numpy(ref_pool(h3.numpy(), 2)), atol=1e-5)
    assert torch.allclose(feats["6"].double(), out, atol=1e-5)
    assert torch.allclose(feats["input"].double(), torch.from_numpy(ref_pool(x.numpy(), 2)), atol=1e-6)
    net.train()
    net[1].eval()
    assert [m.training for m in net.modules()] == [True, True, False, True, True, True, True, True]
    assert [len(m._forward_hooks) for m in net.modules()] == hooks_before
    assert all(not recs for recs in plastic.records.values())  # no plasticity during extraction
    plastic.remove()


def test_unknown_layer_names_are_listed():
    with pytest.raises(ValueError, match=r"(?s)\['conv9'\] match no module.*0, 1, 2, 3"):
        capture_features(small_net(), ["3", "conv9"], torch.zeros(2, 1, 8, 8))


def test_timm_resnet_stages_match_manual_forward():
    m = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    feats = capture_features(m, None, x, pool="global")
    assert list(feats) == ["act1", "layer1", "layer2", "layer3", "layer4"]  # timm feature stages
    hooked = capture_features(m, ["layer2"], x, pool="quadrants", use_timm=False)
    with torch.no_grad():
        h = m.act1(m.bn1(m.conv1(x.float() / 255)))
        l2 = m.layer2(m.layer1(m.maxpool(h)))
    assert torch.allclose(feats["act1"], h.mean((2, 3)), atol=1e-5)
    assert torch.allclose(feats["layer2"], l2.mean((2, 3)), atol=1e-5)
    assert torch.allclose(hooked["layer2"].double(), torch.from_numpy(ref_pool(l2.double().numpy(), 2)), atol=1e-5)


def test_timm_vit_blocks_are_read_as_maps():
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8, depth=2).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    feats = capture_features(m, ["blocks.1"], x, pool="quadrants")
    with torch.no_grad():
        t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x.float() / 255))))
        t = m.blocks[1](m.blocks[0](t))[:, m.num_prefix_tokens:]  # drop the class token: 16 patch tokens
        maps = t.transpose(1, 2).reshape(2, -1, 4, 4)
    assert feats["blocks.1"].shape == (2, 192 * 4)
    assert torch.allclose(feats["blocks.1"].double(), torch.from_numpy(ref_pool(maps.double().numpy(), 2)), atol=1e-4)


def ref_ridge(x, labels, k, alpha):
    """Standardise with train mean / population std, solve (Z^T Z / n + alpha I) W = Z^T (Y - mean Y) / n."""
    x = x.numpy().astype(np.float64)
    y = np.eye(k)[labels.numpy()]
    mu, sd = x.mean(0), x.std(0)
    z = (x - mu) / sd
    n = x.shape[0]
    w_z = np.linalg.solve(z.T @ z / n + alpha * np.eye(x.shape[1]), z.T @ (y - y.mean(0)) / n)
    w = w_z / sd[:, None]
    return w, y.mean(0) - mu @ w


def test_ridge_matches_reference_and_streams():
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(60, 6, generator=g) * 3 + 1, torch.randint(0, 4, (60,), generator=g)
    w, b = ref_ridge(x, labels, 4, 0.3)
    whole = RidgeAccumulator(6, 4).update(x, labels).solve(0.3)
    chunked = RidgeAccumulator(6, 4)
    for i in range(0, 60, 7):
        chunked.update(x[i:i + 7], labels[i:i + 7])
    for sol in (whole, chunked.solve(0.3)):
        assert np.allclose(sol.weight.numpy(), w, atol=1e-9) and np.allclose(sol.bias.numpy(), b, atol=1e-9)
    err = ((x.double().numpy() @ w + b - np.eye(4)[labels.numpy()]) ** 2).sum(1).mean()
    assert chunked.squared_error(chunked.solve(0.3)) == pytest.approx(err, rel=1e-9)
    xt, yt = torch.randn(30, 6, generator=g), torch.randint(0, 4, (30,), generator=g)
    res = fit_ridge(x, labels, xt, yt, alpha=0.3, num_classes=4)
    ref_acc = lambda a, l: float(((a.double().numpy() @ w + b).argmax(1) == l.numpy()).mean())  # noqa: E731
    assert (res.train_acc, res.test_acc, res.alpha) == (ref_acc(x, labels), ref_acc(xt, yt), 0.3)


def test_ridge_alpha_sweep_picks_lowest_held_out_error():
    g = torch.Generator().manual_seed(2)
    x, labels = torch.randn(80, 30, generator=g), torch.randint(0, 3, (80,), generator=g)
    alphas = [1e-3, 1e-1, 10.0]
    res = fit_ridge(x, labels, x[:5], labels[:5], alpha=alphas, num_classes=3, val_fraction=0.25, seed=4)
    held = torch.zeros(80, dtype=torch.bool)
    held[torch.randperm(80, generator=torch.Generator().manual_seed(4))[:20]] = True
    errors = []
    for a in alphas:
        w, b = ref_ridge(x[~held], labels[~held], 3, a)
        errors.append(((x[held].double().numpy() @ w + b - np.eye(3)[labels[held].numpy()]) ** 2).sum(1).mean())
    assert res.alpha == alphas[int(np.argmin(errors))]


def separable(n, noise_seed, d=8, k=4):
    """k well-separated Gaussian clusters (fixed centres), balanced labels."""
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(0)) * 4
    labels = torch.arange(n) % k
    return centres[labels] + 0.3 * torch.randn(n, d, generator=torch.Generator().manual_seed(noise_seed)), labels


def test_ridge_and_logistic_separate_separable_classes():
    (x, y), (xt, yt) = separable(200, 1), separable(100, 2)
    r = fit_ridge(x, y, xt, yt)
    assert r.train_acc == 1.0 and r.test_acc == 1.0
    lg = fit_logistic(x, y, xt, yt, epochs=10, lr=0.05)
    assert lg.train_acc >= 0.98 and lg.test_acc >= 0.98
    with pytest.raises(ValueError, match="same D"):
        fit_ridge(x, y, xt[:, :3], yt)
    with pytest.raises(ValueError, match="dropout"):
        fit_logistic(x, y, xt, yt, dropout=1.0)


def tiny_dataset(n_train=120, n_test=60):
    """Class = which quadrant of an 8x8 image is bright: linearly separable from 2x2-pooled pixels."""
    def make(n, seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 4
        img = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
        for i, c in enumerate(labels.tolist()):
            r, s = divmod(c, 2)
            img[i, 0, 4 * r:4 * r + 4, 4 * s:4 * s + 4] += 150
        return img, labels
    (a, b), (c, d) = make(n_train, 0), make(n_test, 1)
    return ImageDataset(a, b, c, d, ["tl", "tr", "bl", "br"], "quadrants")


def test_evaluate_model_and_baselines():
    ds, net = tiny_dataset(), small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    report = evaluate(net, ds, ["input", "3"], method=["ridge", "logistic"], baselines=("random", "backprop"), epochs=3, batch_size=50)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert report.result("input").test_acc == 1.0
    assert {(r.network, r.layer, r.method) for r in report.rows} == {
        (n, l, m) for n in ("model", "random", "backprop") for l in ("input", "3") for m in ("ridge", "logistic")}
    d = json.loads(json.dumps(report.to_dict()))
    assert d["num_train"] == 120 and len(d["rows"]) == 12
    table = report.table()
    assert "ridge probe" in table and "backprop" in table and "\n3 " in table
    streamed = evaluate(net, ds, ["3"], baselines=(), stream=True, alpha=[0.01, 1.0])
    stored = evaluate(net, ds, ["3"], baselines=(), stream=False, alpha=[0.01, 1.0])
    assert streamed.result("3") == stored.result("3")


def test_evaluate_bad_input_changes_nothing():
    ds, net = tiny_dataset(20, 10), small_net()
    with pytest.raises(ValueError, match="conv9"):
        evaluate(net, ds, ["conv9"])
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(net, ds, ["3"], method="svm")
    with pytest.raises(ValueError, match="unknown method or baseline"):
        evaluate(net, ds, ["3"], baselines=("pretrained",))
    big = ImageDataset(torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
                       torch.zeros(2, 1, 16, 16, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"], "z")
    with pytest.raises(ValueError, match="layer '0' gives 10240 features.*pool it"):  # 40 x 16 x 16 > 8192
        evaluate(nn.Sequential(nn.Conv2d(1, 40, 3, padding=1)), big, ["0"], pool="flatten", baselines=())


def test_random_copy_reinitialises_without_touching_model_or_plasticity():
    net = small_net()
    plastic = hebbloss.attach(net, rule="hebb", targets=["0"])
    state = torch.get_rng_state()
    copy = random_copy(net, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(copy[0].weight, net[0].weight)
    copy(torch.randn(2, 1, 8, 8)).sum()  # with gradients on: the copy must not record into the user's handle
    assert all(not recs for recs in plastic.records.values())
    net(torch.randn(2, 1, 8, 8))
    assert plastic.records["0"]
    plastic.remove()


def test_random_copy_resets_trained_thresholds_of_miconi2021_and_kwta_layers():
    import hebbloss.models

    net = hebbloss.models.miconi2021(channels=(4, 6, 8), pruning=False, triangle=False)
    net.act1.theta.fill_(0.7)  # as if trained
    kwta_net = nn.Sequential(nn.Conv2d(1, 4, 3), hebbloss.KWTA(k=1, homeostasis=1.0, num_channels=4))
    kwta_net[1].theta.fill_(0.3)
    for model, buffer in ((net, "act1.theta"), (kwta_net, "1.theta")):
        copy = random_copy(model, seed=0)
        assert torch.count_nonzero(copy.get_buffer(buffer)) == 0
        assert torch.count_nonzero(model.get_buffer(buffer)) > 0  # the original keeps its thresholds


def test_ridge_solve_many_matches_reference():
    g = torch.Generator().manual_seed(5)
    x, labels = torch.randn(40, 7, generator=g), torch.randint(0, 3, (40,), generator=g)
    acc = RidgeAccumulator(7, 3).update(x, labels)
    alphas = [1e-3, 0.5, 20.0]
    for alpha, sol in zip(alphas, acc.solve_many(alphas)):
        w, b = ref_ridge(x, labels, 3, alpha)
        assert np.allclose(sol.weight.numpy(), w, atol=1e-8) and np.allclose(sol.bias.numpy(), b, atol=1e-8)


def test_random_copy_of_a_trained_pruned_model_redraws_weight_orig_and_keeps_masks():
    import hebbloss
    from hebbloss import prune

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3))
    prune.random_connections(net[2], 0.5, seed=1)
    plastic = hebbloss.attach(net, rule="oja", targets=nn.Conv2d)
    net(torch.randn(2, 1, 8, 8))  # a training forward: net[2].weight is now a non-leaf tensor
    plastic.loss()
    plastic.remove()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copy = random_copy(net, seed=3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the original is untouched
    assert torch.equal(copy[2].weight_mask, net[2].weight_mask)
    assert not torch.equal(copy[2].weight_orig, net[2].weight_orig)
    assert torch.equal(copy[2].weight, copy[2].weight_orig * copy[2].weight_mask)
    assert torch.equal(copy(torch.ones(1, 1, 8, 8)), copy(torch.ones(1, 1, 8, 8)))


def plain_sums(x, labels, k):
    """n, sum x, X^T X, X^T Y, sum y, Y^T Y of float64 numpy data, as torch tensors."""
    x, y = x.astype(np.float64), np.eye(k)[labels]
    return RidgeStats(x.shape[0], *(torch.from_numpy(np.asarray(t)) for t in (x.sum(0), x.T @ x, x.T @ y, y.sum(0), (y * y).sum())))


def test_choose_alpha_is_a_pure_function_of_the_sums_picking_the_lowest_held_out_error():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 25)) * rng.uniform(0.5, 3, size=25) + 2
    labels = (x[:, :3] @ [1.0, -1.0, 0.5] + rng.normal(scale=2.0, size=70) > 2).astype(int) + 2 * (rng.random(70) < 0.3)
    fit_x, fit_y, held_x, held_y = x[:50], labels[:50], x[50:], labels[50:]
    alphas = [1e-4, 1e-2, 1.0, 100.0]
    errors = []
    for a in alphas:  # closed-form ridge on the standardised fit part, squared error on the held-out part
        w, b = ref_ridge(torch.from_numpy(fit_x), torch.from_numpy(fit_y), 4, a)
        errors.append(((held_x @ w + b - np.eye(4)[held_y]) ** 2).sum(1).mean())
    best = alphas[int(np.argmin(errors))]
    assert best not in (alphas[0], alphas[-1])  # the data make the choice matter
    fit, held = plain_sums(fit_x, fit_y, 4), plain_sums(held_x, held_y, 4)
    before = [t.clone() for t in fit[1:] + held[1:]]
    assert choose_alpha(fit, held, alphas) == best
    assert choose_alpha(fit, held, alphas[::-1]) == best
    assert all(torch.equal(a, b) for a, b in zip(before, fit[1:] + held[1:]))  # nothing changed in place
    for a, err in zip(alphas, errors):
        assert squared_error(held, ridge_solution(fit, a)) == pytest.approx(err, rel=1e-9)
    assert choose_alpha(fit, None, [0.5]) == 0.5  # one candidate: nothing to choose, nothing held out
    with pytest.raises(ValueError, match="held-out"):
        choose_alpha(fit, None, alphas)


def noisy_quadrants(n, seed, signal=12):
    """Which quadrant of an 8x8 image is a little brighter, under heavy noise: separable only in part."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    img = torch.randint(0, 100, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        r, s = divmod(c, 2)
        img[i, 0, 4 * r:4 * r + 4, 4 * s:4 * s + 4] += signal
    return img, labels


def test_streamed_and_in_memory_ridge_choose_the_same_alpha_and_accuracy_as_a_float64_reference():
    (a, b), (c, d) = noisy_quadrants(300, 0), noisy_quadrants(100, 1)
    ds, net = ImageDataset(a, b, c, d, ["tl", "tr", "bl", "br"], "noisy"), small_net()
    alphas = [1e-3, 0.1, 1.0, 10.0]
    feats = {split: capture_features(net, ["input", "3"], images) for split, images in (("train", a), ("test", c))}
    held = torch.zeros(300, dtype=torch.bool)  # evaluate's split: 10% held out, drawn with seed 2
    held[torch.randperm(300, generator=torch.Generator().manual_seed(2))[:30]] = True
    expected = {}
    for layer in ("input", "3"):
        x, xt = feats["train"][layer], feats["test"][layer]
        errors = []
        for alpha in alphas:
            w, bias = ref_ridge(x[~held], b[~held], 4, alpha)
            errors.append(((x[held].double().numpy() @ w + bias - np.eye(4)[b[held].numpy()]) ** 2).sum(1).mean())
        chosen = alphas[int(np.argmin(errors))]
        w, bias = ref_ridge(x, b, 4, chosen)  # the winner refitted on the whole training set
        acc = lambda f, l: float(((f.double().numpy() @ w + bias).argmax(1) == l.numpy()).mean())  # noqa: E731
        expected[layer] = (chosen, acc(x, b), acc(xt, d))
    assert {v[0] for v in expected.values()} != {alphas[0]}  # the sweep matters on these data
    for stream in (True, False):
        report = evaluate(net, ds, ["input", "3"], baselines=(), alpha=alphas, stream=stream, batch_size=64, seed=2)
        got = {r.layer: (r.alpha, r.train_acc, r.test_acc) for r in report.rows}
        assert got == expected, f"stream={stream}"
