"""Training-time augmentation that a recipe declares by name (``Recipe.augment``), as pure functions
of a batch and a ``torch.Generator``, so a run is reproducible from its seed.

- ``"hflip"``: each image mirrored left-right with probability 1/2, as Miconi 2021's code does for
  its Hebbian training (``torchvision.transforms.RandomHorizontalFlip()`` in ``transform_unlab``,
  HebbGrad_Github.ipynb, ThomasMiconi/HebbianCNNPyTorch).

    flips = flip_mask(len(batch), generator)        # which images to mirror
    batch = hflip(batch, flips)
    batch = augment(recipe.augment, batch, generator)   # the same, by the recipe's name
"""
from __future__ import annotations

from typing import Optional

import torch

AUGMENTATIONS = ("hflip",)


def check_name(name: Optional[str]) -> Optional[str]:
    """``name`` if it is None or one of :data:`AUGMENTATIONS`; else a ValueError naming the choices."""
    if name is not None and name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose None or one of {', '.join(AUGMENTATIONS)}")
    return name


def flip_mask(n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[n] booleans, each True with probability 1/2 (drawn as ``torch.rand(n, generator) < 0.5``):
    the images a random horizontal flip mirrors."""
    return torch.rand(int(n), generator=generator) < 0.5


def hflip(images: torch.Tensor, mask: Optional[torch.Tensor] = None,
          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``images`` [B, ..., W] with the samples where ``mask`` [B] is True mirrored along the last
    (width) axis; ``mask=None`` draws it with :func:`flip_mask` from ``generator``. A new tensor
    (the input is not changed), same dtype and device."""
    if images.dim() < 2:
        raise ValueError(f"hflip needs a batch [B, ..., W] of at least 2 dims, got shape {tuple(images.shape)}")
    if mask is None:
        mask = flip_mask(images.shape[0], generator)
    if mask.shape != images.shape[:1] or mask.dtype != torch.bool:
        raise ValueError(f"hflip: mask must be {images.shape[0]} booleans (one per image), got {mask.dtype} of shape {tuple(mask.shape)}")
    keep = mask.to(images.device).view(-1, *([1] * (images.dim() - 1)))
    return torch.where(keep, images.flip(-1), images)


def augment(name: Optional[str], images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The augmentation ``name`` (a recipe's ``augment``: None or "hflip") applied to a batch.
    None returns ``images`` itself and draws nothing from ``generator``."""
    if check_name(name) is None:
        return images
    return hflip(images, generator=generator)
