"""The papers' readouts (hebbloss.probe.readouts) and the feature cache they train on
(hebbloss.probe.feature_cache), against references written plainly here in float64."""
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from hebbloss.models.miconi2021 import miconi2021
from hebbloss.probe.feature_cache import (FeatureCache, FeatureCacheWriter, FeatureOverflowError, available_memory,
                                         cache_feature_sets, cache_features)
from hebbloss.probe.readouts import (
    READOUTS, evaluate_paper_readout, fast_dropout, miconi_readout, miconi_ridge, paper_readout_for,
    softhebb_learning_rates, softhebb_milestones, softhebb_readout,
)


def separable(n, dim=16, classes=4, seed=0, dtype=torch.float32):
    """Class c has feature c (and c + classes) at 3, the rest small noise: linearly separable with a margin."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.3 * torch.randn(n, dim, generator=g)
    x[torch.arange(n), y] += 3.0
    x[torch.arange(n), y + classes] += 3.0
    return x.to(dtype), y


# ----------------------------------------------------------------------------------------------- SoftHebb
def test_softhebb_learning_rate_halves_after_the_authors_epochs():
    # utils.py CustomStepLR with nb_epochs=50: halve after epochs int(50 * r), r = .2 .35 .5 .6 .7 .8 .9
    expected = [1e-3] * 10 + [5e-4] * 7 + [2.5e-4] * 8 + [1.25e-4] * 5 + [6.25e-5] * 5 + [3.125e-5] * 5 \
        + [1.5625e-5] * 5 + [7.8125e-6] * 5
    assert softhebb_learning_rates(50, 1e-3) == pytest.approx(expected, rel=1e-12)
    assert softhebb_milestones(50) == [10, 17, 25, 30, 35, 40, 45]
    assert softhebb_learning_rates(30, 1.0) == pytest.approx([1.0] * 15 + [0.5] * 7 + [0.25] * 8)  # after 15, 22
    assert softhebb_learning_rates(10, 1.0) == [1.0] * 10  # no step below 20 epochs
    assert softhebb_milestones(100) == [20, 35, 50, 60, 70, 80, 90]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softhebb_readout_separates_a_separable_problem(dtype):
    x, y = separable(128, dtype=dtype)
    xt, yt = separable(256, seed=1, dtype=dtype)
    result = softhebb_readout(x, y, xt, yt, epochs=10, lr=5e-2)
    assert result.train_acc >= 0.99 and result.test_acc >= 0.99
    assert result.alpha is None


def test_softhebb_readout_is_reproducible_and_identical_from_memory_and_disk(tmp_path):
    x, y = separable(100, seed=2)
    x += torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) * 3  # not trivially separable
    xt, yt = separable(100, seed=3)
    on_disk = FeatureCache.build(x.split(37), 100, dtype=torch.float32, memory_limit=0, folder=tmp_path)
    assert on_disk.on_disk
    a = softhebb_readout(x, y, xt, yt, epochs=2, seed=4)
    b = softhebb_readout(on_disk, y, xt, yt, epochs=2, seed=4)
    assert a == b
    threads = torch.get_num_threads()
    assert softhebb_readout(x, y, xt, yt, epochs=2, seed=4, num_threads=1) == a  # threads change only the speed
    assert torch.get_num_threads() == threads
    c = softhebb_readout(x, y, xt, yt, epochs=2, seed=5)
    assert c != a  # another seed: another initialisation, order and dropout


def test_fast_dropout_drops_half_scales_the_rest_and_leaves_the_input():
    x = torch.rand(64, 1001) + 0.5
    before = x.clone()
    out = fast_dropout(x, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(x, before)
    kept = out != 0
    assert torch.equal(out[kept], 2 * x[kept])
    n = x.numel()
    assert abs(kept.sum().item() - n / 2) < 4 * (n / 4) ** 0.5  # Binomial(n, 1/2) within 4 sigma
    assert not torch.equal(kept[0], kept[1])  # masks differ between samples
    assert torch.equal(fast_dropout(x, 0.0, torch.Generator()), x)


# ----------------------------------------------------------------------------------------------- Miconi
def test_miconi_ridge_is_sklearn_ridge_alpha_1_written_plainly():
    x, y = separable(60, dim=30, seed=6)
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    X = x.double().numpy()
    Y = np.eye(4)[y.numpy()]
    # Ridge(alpha=1.0, fit_intercept=True): centre X and Y, W = (Xc'Xc + I)^-1 Xc'Yc, b = mean(Y) - mean(X) W
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    W = np.linalg.solve(Xc.T @ Xc + np.eye(30), Xc.T @ Yc)
    b = Y.mean(0) - X.mean(0) @ W
    weight, bias = miconi_ridge(x, y, alpha=1.0, num_classes=4)
    np.testing.assert_allclose(weight.numpy(), W, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bias.numpy(), b, rtol=1e-9, atol=1e-12)
    xt, yt = separable(40, dim=30, seed=8)
    result = miconi_readout(x, y, xt, yt)
    assert result.alpha == 1.0
    assert result.train_acc == pytest.approx(float(np.mean((X @ W + b).argmax(1) == y.numpy())))
    assert result.test_acc == pytest.approx(float(np.mean((xt.double().numpy() @ W + b).argmax(1) == yt.numpy())))


def test_miconi_features_are_his_per_sample_standardised_quadrant_means():
    model = miconi2021(channels=(6, 5, 4), seed=0).eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    layers = READOUTS["miconi"].layers(model)
    assert layers == {1: "norm2", 2: "norm3", 3: "pool3"}
    caches = cache_features(model, list(layers.values()), images, pool=READOUTS["miconi"].pool, dtype=torch.float32)

    def quadrants(m):  # HebbGrad_Github.ipynb: mean over [i*w//2:(i+1)*w//2] for i, j in 0, 1
        w = m.shape[2]
        return np.hstack([m[:, :, i * w // 2:(i + 1) * w // 2, j * w // 2:(j + 1) * w // 2].mean(axis=(2, 3))
                          for i in range(2) for j in range(2)])

    def standardise(m):  # x - mean(x, dim=(1,2,3)), / (1e-10 + std(x, dim=(1,2,3))), torch.std is the sample std
        m = m - m.mean(axis=(1, 2, 3), keepdims=True)
        return m / (1e-10 + m.std(axis=(1, 2, 3), ddof=1, keepdims=True))

    with torch.no_grad():
        x, outputs = images, []
        for i in range(1, 4):
            x = getattr(model, f"pool{i}")(getattr(model, f"act{i}")(getattr(model, f"conv{i}")(getattr(model, f"norm{i}")(x))))
            outputs.append(x.double().numpy())
    expected = [quadrants(standardise(outputs[0])), quadrants(standardise(outputs[1])), quadrants(outputs[2])]
    for (block, name), want in zip(layers.items(), expected):
        got = caches[name][torch.arange(3)].double().numpy()
        # ours is channel-major [C, 2, 2], his quadrant-major [4, C]: the same values in another order
        got = got.reshape(3, -1, 4).transpose(0, 2, 1).reshape(3, -1)
        # the network divides by the population std: sqrt(n / (n - 1)) - 1 <= 3e-3 here, 2.6e-5 at full size
        n = outputs[block - 1][0].size
        np.testing.assert_allclose(got, want, rtol=1.2 * (np.sqrt(n / (n - 1)) - 1) + 1e-6 if block < 3 else 1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- by name
def test_paper_readouts_resolve_from_model_names():
    assert paper_readout_for("softhebb") is READOUTS["softhebb"]
    assert paper_readout_for("softhebb-cifar10") is READOUTS["softhebb"]
    assert paper_readout_for("miconi2021") is READOUTS["miconi"]
    assert paper_readout_for(miconi2021(channels=(2, 2, 2))) is READOUTS["miconi"]  # by its recipe's name
    with pytest.raises(ValueError, match="softhebb"):
        paper_readout_for("resnet18")
    assert READOUTS["softhebb"].pool == "flatten" and READOUTS["miconi"].pool == "quadrants"


def test_evaluate_paper_readout_is_the_readout_of_the_flattened_block_output():
    class Tiny(nn.Module):
        feature_layers = ("pool1",)

        def __init__(self):
            super().__init__()
            self.conv1, self.pool1 = nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool1(torch.relu(self.conv1(x)))

    model = Tiny()
    g = torch.Generator().manual_seed(10)
    images, labels = torch.rand(80, 3, 8, 8, generator=g), torch.randint(0, 3, (80,), generator=g)
    out = evaluate_paper_readout(model, "softhebb", images[:64], labels[:64], images[64:], labels[64:], epochs=2, seed=1)
    with torch.no_grad():
        # the block output, every value, stored in float16 (each set in one batch, as the cache computes it)
        train, test = (model(part).flatten(1).half() for part in (images[:64], images[64:]))
    assert list(out) == ["pool1"]
    assert out["pool1"] == softhebb_readout(train, labels[:64], test, labels[64:], epochs=2, seed=1)


# ----------------------------------------------------------------------------------------------- the cache
def test_cache_gives_identical_batches_from_memory_and_from_disk(tmp_path):
    x = torch.randn(300, 23, generator=torch.Generator().manual_seed(11))
    in_memory = FeatureCache.build(x.split(64), 300)
    on_disk = FeatureCache.build(iter(x.split(50)), 300, memory_limit=1000, folder=tmp_path, name="train")
    assert not in_memory.on_disk and on_disk.on_disk and on_disk.path == tmp_path / "train.npy"
    assert on_disk.dtype == in_memory.dtype == torch.float16 and len(on_disk) == 300 and on_disk.dim == 23
    index = torch.tensor([299, 0, 17, 17, 150])
    assert torch.equal(on_disk[index], x[index].half()) and torch.equal(in_memory[index], x[index].half())
    for shuffle in (False, True):
        a = list(in_memory.batches(32, shuffle, torch.Generator().manual_seed(3)))
        b = list(on_disk.batches(32, shuffle, torch.Generator().manual_seed(3)))
        assert len(a) == len(b) == 10
        for (ia, xa), (ib, xb) in zip(a, b):
            assert torch.equal(ia, ib) and torch.equal(xa, xb) and xa.dtype == torch.float32
            assert torch.equal(xa, x[ia].half().float())
    assert torch.equal(FeatureCache.load(tmp_path / "train.npy")[index], x[index].half())


def test_cache_leaves_no_file_when_the_batches_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def failing():
        yield torch.ones(4, 3)
        raise RuntimeError("extraction failed")

    for folder in (tmp_path / "cache", None):
        with pytest.raises(RuntimeError, match="extraction failed"):
            FeatureCache.build(failing(), 8, memory_limit=0, folder=folder)
        with pytest.raises(ValueError, match="gave 4 rows"):
            FeatureCache.build([torch.ones(4, 3)], 8, memory_limit=0, folder=folder)
        with pytest.raises(ValueError, match="expected"):
            FeatureCache.build([torch.ones(4, 3), torch.ones(4, 2)], 8, memory_limit=0, folder=folder)
        with pytest.raises(ValueError, match="float32"):  # beyond float16's range: refused, not stored as inf
            FeatureCache.build([torch.ones(4, 3), torch.full((4, 3), 7e4)], 8, memory_limit=0, folder=folder)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary folders are gone too


def test_cache_memory_limit_follows_the_setting_and_the_available_memory(tmp_path):
    x = torch.randn(10, 8)  # 160 bytes in float16
    assert not FeatureCache.build([x], 10, memory_limit=160).on_disk
    assert FeatureCache.build([x], 10, memory_limit=159, folder=tmp_path).on_disk
    available = available_memory()
    with open("/proc/meminfo") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    assert 0 < available <= fields["MemTotal"]
    with FeatureCacheWriter(10, 8) as writer:  # the default limit is a fraction of the available memory
        assert not writer.on_disk
        writer.write(x)
        cache = writer.close()
    assert torch.equal(cache[torch.arange(10)], x.half())


def test_cache_features_stores_a_frozen_network_layer_once(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.AvgPool2d(2))
    images = torch.rand(7, 3, 10, 10, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        want = model[1](model[0](images)).flatten(1)  # the ReLU output, every value, C-major
    for limit in (None, 0):
        caches = cache_features(model, ["1"], images, batch_size=3, memory_limit=limit, folder=tmp_path)
        assert caches["1"].on_disk == (limit == 0)
        got = caches["1"][torch.arange(7)]
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-4)  # float16 rounding


@pytest.mark.parametrize("large_in", ["train", "test"])
def test_feature_sets_fall_back_to_float32_together_when_a_value_exceeds_float16(tmp_path, large_in):
    """An untrained network without normalisation reaches 1e5 (the SoftHebb random baseline): the sets
    are cached in float32, all of them, with the values a plain float64 forward gives."""
    model = nn.Sequential(nn.Conv2d(4, 3, 1, bias=False))  # a linear map of 1x1 images
    w = torch.tensor([[1.0, 2, 3, 4], [-1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]])
    with torch.no_grad():
        model[0].weight.copy_(w[:, :, None, None])
    g = torch.Generator().manual_seed(13)
    sets = {"train": torch.rand(6, 4, 1, 1, generator=g), "test": torch.rand(5, 4, 1, 1, generator=g)}
    sets[large_in][2] *= 3e4  # one sample's first output is about 1e5, beyond float16's 65504
    want = {k: v.flatten(1).double() @ w.double().T for k, v in sets.items()}
    for limit in (None, 0):
        folders = [tmp_path / f"{limit}" / "train", tmp_path / f"{limit}" / "test"]
        train, test = cache_feature_sets(model, ["0"], [sets["train"], sets["test"]], folders, memory_limit=limit, batch_size=4)
        for cache, key in ((train, "train"), (test, "test")):
            got = cache["0"][torch.arange(len(sets[key]))]
            assert got.dtype == torch.float32 and cache["0"].on_disk == (limit == 0)
            torch.testing.assert_close(got.double(), want[key], rtol=1e-6, atol=1e-5)
    with pytest.raises(FeatureOverflowError, match="float16"):
        cache_feature_sets(model, ["0"], [sets["train"], sets["test"]], dtype=torch.float16)
    train, test = cache_feature_sets(model, ["0"], [sets["train"] / 3e5, sets["test"] / 3e5])
    assert train["0"].dtype == test["0"].dtype == torch.float16  # small features stay float16
