"""ZCA whitening (Miconi 2021's preprocessing): fitted once, whitening, saved and reloaded exactly."""

import pytest
import torch

from hebbloss.zca import ZCA

D = torch.float64


def correlated_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(12, 12, generator=g, dtype=D)
    return (torch.randn(n, 12, generator=g, dtype=D) @ mix + 3.0).reshape(n, 3, 2, 2)


def test_matrix_matches_svd_reference_and_whitens():
    x = correlated_images(400)
    eps = 1e-6
    zca = ZCA(standardize=False).fit(x, eps=eps)
    flat = x.reshape(400, -1)
    centred = flat - flat.mean(dim=0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)  # independent route: SVD of the data
    reference = vt.T @ torch.diag(1.0 / torch.sqrt(s ** 2 / 400 + eps)) @ vt
    assert torch.allclose(zca.matrix, reference, atol=1e-8)
    white = zca(x).reshape(400, -1)
    cov = white.T @ white / 400
    assert torch.allclose(cov, torch.eye(12, dtype=D), atol=1e-4)


def test_standardize_then_whiten():
    x = correlated_images(300)
    zca = ZCA(standardize=True).fit(x, eps=1e-3)
    one = x[:1].reshape(1, -1)
    std = (one - one.mean()) / (one.std() + 1e-10)
    expected = ((std - zca.mean.reshape(1, -1)) @ zca.matrix).reshape(1, 3, 2, 2)
    assert torch.allclose(zca(x[:1]), expected)
    assert torch.allclose(zca(x[0]), expected[0])  # unbatched image


def test_rank_deficient_data_stays_finite():
    x = torch.rand(5, 3, 4, 4)  # 5 images, 48 pixels
    x[:, 0, 0, 0] = 0.5          # a constant pixel
    out = ZCA().fit(x, eps=1e-3)(x)
    assert torch.isfinite(out).all()


def test_state_dict_round_trip_is_exact(tmp_path):
    x = correlated_images(100).float()
    zca = ZCA().fit(x)
    path = tmp_path / "zca.pt"
    torch.save(zca.state_dict(), path)
    loaded = ZCA()
    loaded.load_state_dict(torch.load(path))
    assert torch.equal(loaded.matrix, zca.matrix) and torch.equal(loaded.mean, zca.mean)
    assert torch.equal(loaded(x), zca(x))


def test_bad_use_gives_clear_errors():
    with pytest.raises(RuntimeError, match="not fitted"):
        ZCA()(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="eps"):
        ZCA().fit(torch.rand(4, 3), eps=0)
    with pytest.raises(ValueError, match="at least 2 images"):
        ZCA().fit(torch.rand(1, 3))
    zca = ZCA().fit(torch.rand(10, 3, 2, 2))
    with pytest.raises(ValueError, match=r"fitted on images of shape \(3, 2, 2\)"):
        zca(torch.rand(2, 3, 4, 4))
    bad = torch.rand(4, 3)
    bad[0, 0] = float("nan")
    fresh = ZCA()
    with pytest.raises(ValueError, match="NaN"):
        fresh.fit(bad)
    assert fresh.matrix is None
