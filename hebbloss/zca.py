"""ZCA whitening of whole images, Miconi 2021's input preprocessing (Bell & Sejnowski 1997).

    zca = hebbloss.zca.ZCA().fit(train_images, eps=1e-3)   # once, on training images
    torch.save(zca.state_dict(), "zca.pt")                  # buffers: mean, matrix
    x_white = zca(x)

With X the [N, D] flattened (optionally per-image standardised) training images, mu their mean
and C = (X - mu)^T (X - mu) / N = E diag(l) E^T (torch.linalg.eigh, in float64), the transform
is W = E diag(1 / sqrt(l + eps)) E^T and zca(x) = (x - mu) W. eps > 0 keeps it finite on
rank-deficient data (fewer images than pixels, constant pixels).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def standardize_images(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each image (first dim = samples) shifted to mean 0 and scaled to std 1 over all its values."""
    flat = x.reshape(x.shape[0], -1)
    flat = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + eps)
    return flat.reshape(x.shape)


def zca_matrix(data: torch.Tensor, eps: float) -> tuple:
    """(mean [D], whitening matrix [D, D]) of [N, D] data, computed in float64 (Bell & Sejnowski 1997)."""
    x = data.to(torch.float64)
    mean = x.mean(dim=0)
    centred = x - mean
    cov = centred.T @ centred / x.shape[0]
    eigvals, eigvecs = torch.linalg.eigh(cov)
    scale = (eigvals.clamp(min=0) + eps).rsqrt()
    return mean, (eigvecs * scale) @ eigvecs.T


class ZCA(nn.Module):
    """ZCA whitening fitted once on training images; ``mean`` and ``matrix`` are buffers.

    standardize: standardise each image before fitting and before whitening (Miconi 2021).
    The module maps [B, *image_shape] to the same shape; call :meth:`fit` before using it.
    """

    def __init__(self, standardize: bool = True):
        super().__init__()
        self.standardize = bool(standardize)
        self.register_buffer("mean", None)
        self.register_buffer("matrix", None)
        self.register_buffer("eps", None)

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
        mean, matrix = zca_matrix(x.reshape(x.shape[0], -1), float(eps))
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
        return f"standardize={self.standardize}, image_shape={shape}"
