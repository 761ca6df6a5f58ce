"""Input preprocessing of a ``hebbloss`` run: uint8 images -> floats the network sees.

Per-channel standardisation with the training set's statistics, or ZCA whitening fitted on the
training images (Miconi 2021's input; ``hebbloss.zca.ZCA``). Its state lives in ``state_dict`` and is
saved in the checkpoint, so a resumed or re-probed run sees exactly the same inputs.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ..zca import ZCA, check_settings, fit_zca, zca_from_settings


class Preprocess(nn.Module):
    """``forward(uint8 [B, C, H, W]) -> float``: scaled to [0, 1], then ZCA-whitened (``zca=True``, or
    a dict of ZCA settings such as a recipe's ``zca``, e.g. ``hebbloss.zca.MICONI2021``) or
    standardised per channel. Call :meth:`fit` on the training images (or load a state_dict) first."""

    def __init__(self, zca: Union[bool, Mapping[str, Any], None] = False, eps: float = 1e-3):
        super().__init__()
        self.eps = float(eps)
        self.register_buffer("mean", None)
        self.register_buffer("std", None)
        self.zca_settings = check_settings(zca) if isinstance(zca, Mapping) else None
        if self.zca_settings is not None:
            self.zca = zca_from_settings(self.zca_settings)
        else:
            self.zca = ZCA(standardize=True) if zca else None

    @torch.no_grad()
    def fit(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> "Preprocess":
        """Channel statistics (float64 sums, bounded memory) and, with ZCA, the whitening of ``images``
        (with ZCA settings, fitted by ``hebbloss.zca.fit_zca``, its random draws from ``generator``)."""
        c = images.shape[1]
        total, total_sq, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
        for chunk in images.split(1024):
            x = chunk.double().div_(255.0).transpose(0, 1).reshape(c, -1)
            total, total_sq, count = total + x.sum(1), total_sq + x.pow(2).sum(1), count + x.shape[1]
        mean = total / count
        var = (total_sq / count - mean.pow(2)).clamp_min(0) * count / max(count - 1, 1)
        self.mean, self.std = mean.float(), var.sqrt().clamp_min(1e-6).float()
        if self.zca_settings is not None:
            self.zca = fit_zca(images.float().div_(255.0), {"eps": self.eps, **self.zca_settings}, generator)
        elif self.zca is not None:
            self.zca.fit(images.float().div_(255.0), eps=self.eps)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("mean", "std"):  # an unfitted module takes a fitted one's buffers
            if prefix + key in state_dict and getattr(self, key) is None:
                setattr(self, key, torch.empty_like(state_dict[prefix + key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        if self.zca is not None:
            return self.zca(x)
        return x.sub_(self.mean.view(1, -1, 1, 1)).div_(self.std.view(1, -1, 1, 1))

    def apply_in_chunks(self, images: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """The whole image set preprocessed, in chunks (for probing a dataset)."""
        return torch.cat([self(part) for part in images.split(chunk)]) if len(images) else self(images)
