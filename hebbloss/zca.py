"""ZCA whitening of whole images, Miconi 2021's input preprocessing (Bell & Sejnowski 1997).

    zca = hebbloss.zca.ZCA().fit(train_images, eps=1e-3)   # once, on training images
    torch.save(zca.state_dict(), "zca.pt")                  # buffers: mean, matrix
    x_white = zca(x)

With X the [N, D] flattened (optionally per-image standardised) training images, mu their mean
and C = (X - mu)^T (X - mu) / N = E diag(l) E^T (torch.linalg.eigh, in float64), the transform
is W = E diag(1 / sqrt(l + eps)) E^T and zca(x) = (x - mu) W. eps > 0 keeps it finite on
rank-deficient data (fewer images than pixels, constant pixels).

Miconi 2021's own code computes it differently (``ZCA.miconi2021()``, :func:`fit_zca` with
:data:`MICONI2021`): no per-pixel mean (mu = 0; the per-image standardisation is the only
centring), C = X^T X / D (divided by the number of values per image, not of images) and the
matrix fitted on one shuffled batch of 9,000 randomly flipped training images. With N = 9,000
and D = 3,072 his eps = 1e-3 acts like eps = 3.4e-4 on the covariance: about 3x less
regularisation than the default here.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .data.augment import check_name, hflip

DIVISORS = ("samples", "features")

# Miconi 2021's ZCA, HebbGrad_Github.ipynb (ThomasMiconi/HebbianCNNPyTorch), the cell "Building ZCA
# filter" with ZCA = 'IMAGE': t standardised per image (torch.std, + 1e-10), no per-pixel mean,
# covt = t.T @ t / t.shape[1] (the number of values per image), covt += 1e-3 * I, symeig;
# fitted on the first batch of `zcaloader` (batch_size=9000, shuffle=True, transform_zca with
# RandomHorizontalFlip and an identity RandomCrop(32) on 32x32 images).
MICONI2021 = {"standardize": True, "center": False, "divisor": "features", "eps": 1e-3,
              "fit_images": 9000, "fit_augment": "hflip"}


def standardize_images(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each image (first dim = samples) shifted to mean 0 and scaled to std 1 over all its values."""
    flat = x.reshape(x.shape[0], -1)
    flat = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + eps)
    return flat.reshape(x.shape)


def zca_matrix(data: torch.Tensor, eps: float, center: bool = True, divisor: str = "samples") -> tuple:
    """(mean [D], whitening matrix [D, D]) of [N, D] data, computed in float64 (Bell & Sejnowski 1997).

    center: subtract the per-feature mean (False: mean = 0, Miconi 2021's code).
    divisor: the Gram matrix is divided by N, the number of samples (a covariance), or by D,
        the number of features ("features", Miconi 2021's code).
    """
    if divisor not in DIVISORS:
        raise ValueError(f"zca_matrix: divisor must be one of {', '.join(DIVISORS)}, got {divisor!r}")
    x = data.to(torch.float64)
    mean = x.mean(dim=0) if center else torch.zeros_like(x[0])
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] if divisor == "samples" else x.shape[1])
    eigvals, eigvecs = torch.linalg.eigh(cov)
    scale = (eigvals.clamp(min=0) + eps).rsqrt()
    return mean, (eigvecs * scale) @ eigvecs.T


class ZCA(nn.Module):
    """ZCA whitening fitted once on training images; ``mean`` and ``matrix`` are buffers.

    standardize: standardise each image before fitting and before whitening (Miconi 2021).
    center: subtract the training images' per-pixel mean (False: none, as Miconi 2021's code;
        the ``mean`` buffer is then zeros).
    divisor: "samples" (the covariance X^T X / N) or "features" (X^T X / D, Miconi 2021's code).
    The module maps [B, *image_shape] to the same shape; call :meth:`fit` before using it.
    """

    def __init__(self, standardize: bool = True, center: bool = True, divisor: str = "samples"):
        super().__init__()
        if divisor not in DIVISORS:
            raise ValueError(f"ZCA: divisor must be one of {', '.join(DIVISORS)}, got {divisor!r}")
        self.standardize, self.center, self.divisor = bool(standardize), bool(center), divisor
        self.register_buffer("mean", None)
        self.register_buffer("matrix", None)
        self.register_buffer("eps", None)

    @classmethod
    def miconi2021(cls) -> "ZCA":
        """The ZCA of Miconi 2021's code: per-image standardisation, no per-pixel mean, Gram matrix
        divided by the number of values per image; fit it with eps=1e-3 on 9,000 randomly flipped
        training images (:func:`fit_zca` with :data:`MICONI2021` does all of it)."""
        return cls(standardize=True, center=False, divisor="features")

    @torch.no_grad()
    def fit(self, images: torch.Tensor, eps: float = 1e-3) -> "ZCA":
        """Fit mean and whitening matrix on [N, *image_shape] training images; returns self."""
        if not isinstance(images, torch.Tensor) or images.dim() < 2 or images.shape[0] < 2:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"ZCA.fit needs a tensor of at least 2 images [N, ...], got {shape}")
        if not (float(eps) > 0 and math.isfinite(eps)):
            raise ValueError(f"ZCA.fit: eps must be a finite number > 0 (it keeps the inverse square root finite), got {eps!r}")
        if not torch.isfinite(images).all():
            raise ValueError("ZCA.fit: the images contain NaN or Inf")
        x = standardize_images(images) if self.standardize else images
        mean, matrix = zca_matrix(x.reshape(x.shape[0], -1), float(eps), self.center, self.divisor)
        dtype = images.dtype if images.is_floating_point() else torch.float32
        self.mean = mean.to(dtype).reshape(images.shape[1:])
        self.matrix = matrix.to(dtype)
        self.eps = torch.tensor(float(eps), dtype=torch.float64)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("mean", "matrix", "eps"):  # let an unfitted ZCA receive a fitted one's buffers
            if prefix + key in state_dict and getattr(self, key) is None:
                setattr(self, key, torch.empty_like(state_dict[prefix + key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix is None:
            raise RuntimeError("ZCA is not fitted: call zca.fit(train_images) or load a fitted state_dict first")
        batched = x.dim() == self.mean.dim() + 1
        if not batched and x.shape != self.mean.shape:
            raise ValueError(f"ZCA was fitted on images of shape {tuple(self.mean.shape)}, got input of shape {tuple(x.shape)}")
        xb = x if batched else x.unsqueeze(0)
        if xb.shape[1:] != self.mean.shape:
            raise ValueError(f"ZCA was fitted on images of shape {tuple(self.mean.shape)}, got a batch of shape {tuple(x.shape)}")
        if self.standardize:
            xb = standardize_images(xb)
        flat = (xb - self.mean).reshape(xb.shape[0], -1) @ self.matrix.to(xb.dtype)
        out = flat.reshape(xb.shape)
        return out if batched else out[0]

    def extra_repr(self) -> str:
        shape = None if self.mean is None else tuple(self.mean.shape)
        return f"standardize={self.standardize}, center={self.center}, divisor={self.divisor}, image_shape={shape}"


ZCA_SETTINGS = ("standardize", "center", "divisor", "eps", "fit_images", "fit_augment")


def check_settings(settings: Mapping[str, Any]) -> dict:
    """``settings`` (a recipe's ``zca``) as a dict, after checking its keys against :data:`ZCA_SETTINGS`."""
    unknown = sorted(set(settings) - set(ZCA_SETTINGS))
    if unknown:
        raise ValueError(f"ZCA settings {unknown} are unknown; the settings are {', '.join(ZCA_SETTINGS)}")
    check_name(settings.get("fit_augment"))
    return dict(settings)


def zca_from_settings(settings: Optional[Mapping[str, Any]] = None) -> ZCA:
    """An unfitted :class:`ZCA` with the standardize / center / divisor of ``settings`` (checked
    by :func:`check_settings`; missing keys take the constructor's defaults)."""
    s = check_settings(settings or {})
    return ZCA(s.get("standardize", True), s.get("center", True), s.get("divisor", "samples"))


@torch.no_grad()
def fit_zca(images: torch.Tensor, settings: Optional[Mapping[str, Any]] = None,
            generator: Optional[torch.Generator] = None) -> ZCA:
    """A :class:`ZCA` built and fitted on float ``images`` [N, ...] as ``settings`` say (e.g.
    :data:`MICONI2021`, or a recipe's ``zca``): the constructor's standardize / center / divisor,
    ``eps`` for :meth:`ZCA.fit` (1e-3), ``fit_images`` (fit on that many images drawn at random
    without replacement; None: all) and ``fit_augment`` ("hflip": each of them mirrored with
    probability 1/2). The draws come from ``generator`` (subset first, then the flips)."""
    s = check_settings(settings or {})
    zca = zca_from_settings(s)
    count = s.get("fit_images")
    if count is not None:
        if not isinstance(count, int) or count < 2:
            raise ValueError(f"ZCA settings: fit_images must be an int >= 2 (or None for all images), got {count!r}")
        if count < images.shape[0]:
            images = images[torch.randperm(images.shape[0], generator=generator)[:count]]
    if s.get("fit_augment") == "hflip":
        images = hflip(images, generator=generator)
    return zca.fit(images, eps=s.get("eps", 1e-3))
