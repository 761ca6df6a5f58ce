"""The papers' readouts as methods of hebbloss.probe.evaluate: the paper's layers and pooling, the model and
every baseline read the same way, features beyond the memory limit read from a disk cache.

The reference is evaluate_paper_readout called directly on each network (the model, and the random copy
built as evaluate builds it), itself checked against the plain readout in tests/test_readouts.py.
"""

import pytest
import torch
from torch import nn

from hebbloss import models
from hebbloss.data import ImageDataset
from hebbloss.probe import evaluate, evaluate_paper_readout, feature_cache
from hebbloss.probe.baselines import random_copy
from hebbloss.probe.evaluate import RANDOM_SEED_OFFSET


def dataset(channels=3, size=32, n_train=40, n_test=20, seed=0):
    """Random uint8 images with labels covering all 10 classes."""
    g = torch.Generator().manual_seed(seed)
    images = lambda n: torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)  # noqa: E731
    return ImageDataset(images(n_train), torch.arange(n_train) % 10, images(n_test), torch.arange(n_test) % 10,
                        [str(i) for i in range(10)], "random")


def small(name):
    if name == "softhebb":
        return models.create("softhebb", depth=2, channels=(4, 6))
    return models.create("miconi2021", channels=(4, 6, 8), pruning=False)


@pytest.mark.parametrize("name, readout, layers, pool", [
    ("softhebb", "softhebb", ["pool1", "pool2"], "flatten"),
    ("miconi2021", "miconi", ["norm2", "norm3", "pool3"], "quadrants"),
])
def test_paper_method_reads_the_model_and_the_random_baseline_at_the_papers_layers(name, readout, layers, pool):
    torch.manual_seed(0)
    model, ds, seed = small(name), dataset(), 3
    report = evaluate(model, ds, method="paper", epochs=2, seed=seed)
    assert report.pool == pool
    assert [(r.network, r.layer, r.method) for r in report.rows] == [(n, l, readout) for n in ("model", "random") for l in layers]
    split = (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
    for network, net in (("model", model), ("random", random_copy(model, seed + RANDOM_SEED_OFFSET))):
        options = {"epochs": 2} if readout == "softhebb" else {}  # Miconi's ridge has no epochs
        expected = evaluate_paper_readout(net, readout, *split, seed=seed, num_classes=10, **options)
        assert list(expected) == layers
        for layer, res in expected.items():
            assert report.result(layer, network, readout) == res, (network, layer)
    # the same report when the readout is named
    named = evaluate(model, ds, method=readout, epochs=2, seed=seed)
    assert [(r.network, r.layer, r.test_acc, r.train_acc) for r in named.rows] == \
           [(r.network, r.layer, r.test_acc, r.train_acc) for r in report.rows]


def test_paper_readout_dims_are_the_flattened_block_outputs():
    torch.manual_seed(0)
    model, ds = small("softhebb"), dataset()
    report = evaluate(model, ds, method="softhebb", epochs=1, baselines=())
    shapes = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o[0].numel()))
             for n in ("pool1", "pool2")]
    with torch.no_grad():
        model.eval()(ds.train_images[:1].float() / 255)
    for h in hooks:
        h.remove()
    assert {r.layer: r.dim for r in report.rows} == shapes  # every value of each block's output


def spy_caches(monkeypatch):
    """Record whether each feature cache evaluate builds lies on disk."""
    seen = []
    real = feature_cache.cache_features

    def spy(*args, **kwargs):
        caches = real(*args, **kwargs)
        seen.extend(c.on_disk for c in caches.values())
        return caches

    monkeypatch.setattr(feature_cache, "cache_features", spy)
    return seen


@pytest.mark.parametrize("method, pool", [("softhebb", None), ("logistic", "flatten")])
def test_features_beyond_the_memory_limit_come_from_disk_with_the_same_result(monkeypatch, method, pool):
    torch.manual_seed(0)
    model, ds = small("softhebb"), dataset()
    kwargs = dict(method=method, pool=pool, epochs=2, seed=1, layers=["pool1", "pool2"])
    seen = spy_caches(monkeypatch)
    in_memory = evaluate(model, ds, **kwargs)
    assert not any(seen)  # (logistic in memory does not use a cache at all)
    seen.clear()
    on_disk = evaluate(model, ds, max_feature_bytes=1, **kwargs)  # the old code refused logistic here
    assert seen and all(seen)
    assert [(r.network, r.layer, r.method, r.dim, r.train_acc, r.test_acc) for r in on_disk.rows] == \
           [(r.network, r.layer, r.method, r.dim, r.train_acc, r.test_acc) for r in in_memory.rows]


def test_paper_method_without_a_paper_readout_or_mixed_with_others_is_refused_clearly():
    ds = dataset(n_train=10, n_test=10)
    plain = nn.Sequential(nn.Conv2d(3, 2, 3))
    with pytest.raises(ValueError, match="no paper readout is known for model 'Sequential'"):
        evaluate(plain, ds, method="paper")
    with pytest.raises(ValueError, match="evaluate it alone"):
        evaluate(small("softhebb"), ds, method=["ridge", "softhebb"])
    with pytest.raises(ValueError, match="only ridge can be streamed"):
        evaluate(small("softhebb"), ds, method="softhebb", stream=True)
