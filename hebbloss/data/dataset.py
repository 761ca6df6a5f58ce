"""The in-memory form of every hebbloss dataset: uint8 image tensors and int64 labels."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch


@dataclass
class ImageDataset:
    """A decoded image-classification dataset held as tensors.

    train_images / test_images: uint8 [N, C, H, W]; train_labels / test_labels: int64 [N];
    classes: class names, index = label; name: the name it was loaded under.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: List[str] = field(default_factory=list)
    name: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self):
        """(C, H, W) of one image."""
        return tuple(self.train_images.shape[1:])

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.name!r}: train {tuple(self.train_images.shape)}, test {tuple(self.test_images.shape)}, "
            f"{self.num_classes} classes)"
        )
