"""The SoftHebb convolutional networks of Journe et al. 2023, "Hebbian deep learning without
feedback" (ICLR 2023; 80.3% CIFAR-10 linear probe).

Each block: BatchNorm without affine parameters -> conv (reflect padding, no bias) ->
Triangle(power) -> pooling. Plasticity: the SoftHebb rule dW = y (x - u W) driven by a soft-WTA
with anti-Hebbian losers (inverse temperature per layer); updates max-abs normalised per layer
and scaled per neuron by |norm(W_c) - 1| ** 0.5; weights initialised at radius 25; SGD with
batch 10 for one epoch. Layer settings are the authors' published presets.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..init import init_radius
from ..competition import SoftWTA, Triangle
from .recipe import LayerRecipe, Recipe

PAPER = "Journe, Garcia Rodriguez, Guo & Moraitis 2023, Hebbian deep learning without feedback, ICLR"
INIT_RADIUS = 25.0


@dataclass(frozen=True)
class Block:
    """One SoftHebb block: conv width/kernel/padding, Triangle power, pooling, beta and eta."""

    channels: int
    kernel: int
    padding: int
    power: float
    pool: Tuple[str, int, int, int]   # ("max" | "avg", kernel, stride, padding)
    inverse_temperature: float
    lr: float


CIFAR10 = (
    Block(96, 5, 2, 0.7, ("max", 4, 2, 1), 1.0, 0.08),
    Block(384, 3, 1, 1.4, ("max", 4, 2, 1), 0.65, 0.005),
    Block(1536, 3, 1, 1.0, ("avg", 2, 2, 0), 0.25, 0.01),
)
STL10 = (
    Block(96, 5, 2, 0.7, ("avg", 4, 2, 1), 1.0, 0.08),
    Block(384, 3, 1, 0.7, ("max", 4, 2, 1), 0.65, 0.005),
    Block(1536, 3, 1, 1.4, ("avg", 4, 2, 1), 0.45, 0.01),
    Block(6144, 3, 1, 1.0, ("avg", 2, 2, 0), 0.25, 0.01),
)
VARIANTS = {
    "cifar10": (3, CIFAR10), "cifar100": (3, CIFAR10),
    "mnist": (1, CIFAR10), "fashionmnist": (1, CIFAR10),
    "stl10": (3, STL10),
}


def _pool(spec):
    kind, kernel, stride, padding = spec
    return nn.MaxPool2d(kernel, stride, padding) if kind == "max" else nn.AvgPool2d(kernel, stride, padding)


class SoftHebbNet(nn.Module):
    """The network (no classifier: probe ``feature_layers`` linearly). See :func:`softhebb`."""

    def __init__(self, in_channels: int, blocks: Sequence[Block], dataset: str, seed: Optional[int] = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        width = in_channels
        for i, b in enumerate(blocks, start=1):
            conv = nn.Conv2d(width, b.channels, b.kernel, padding=b.padding, padding_mode="reflect", bias=False)
            init_radius(conv, INIT_RADIUS, generator=generator)
            setattr(self, f"bn{i}", nn.BatchNorm2d(width, affine=False))
            setattr(self, f"conv{i}", conv)
            setattr(self, f"act{i}", Triangle(b.power))
            setattr(self, f"pool{i}", _pool(b.pool))
            width = b.channels
        self.num_blocks = len(blocks)
        self.plastic_layers = tuple(f"conv{i}" for i in range(1, len(blocks) + 1))
        self.feature_layers = tuple(f"pool{i}" for i in range(1, len(blocks) + 1))
        self.recipe = Recipe(
            name=f"softhebb-{dataset}",
            layers={f"conv{i}": LayerRecipe("softhebb", SoftWTA(b.inverse_temperature), b.lr)
                    for i, b in enumerate(blocks, start=1)},
            batch_size=10,
            epochs=1,
            softhebb_power=0.5,
            paper=PAPER,
            notes={
                "input": "images in [0, 1]; the first BatchNorm standardises them",
                "classifier": "the paper trains dropout(0.5) + linear on the flattened last block (Adam, 50 epochs)",
                "variant": dataset + (" (CIFAR-10 layer settings on 1-channel input)" if in_channels == 1 else ""),
            },
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.num_blocks + 1):
            x = getattr(self, f"pool{i}")(getattr(self, f"act{i}")(getattr(self, f"conv{i}")(getattr(self, f"bn{i}")(x))))
        return x


def softhebb(dataset: str = "cifar10", channels: Optional[Sequence[int]] = None, seed: Optional[int] = 0) -> SoftHebbNet:
    """SoftHebb's network for ``dataset`` ("cifar10", "cifar100", "mnist", "fashionmnist": 96-384-1536;
    "stl10": 96-384-1536-6144), ready for ``model.recipe.attach(model)``.

    channels: override the widths (same number of blocks; for quick tests).
    seed: fixes the initial weights (None: torch's global generator).
    """
    key = str(dataset).lower().replace("-", "").replace("_", "")
    if key not in VARIANTS:
        raise ValueError(f"softhebb: unknown dataset {dataset!r}; choose one of {', '.join(sorted(VARIANTS))}")
    in_channels, blocks = VARIANTS[key]
    if channels is not None:
        channels = tuple(channels)
        if len(channels) != len(blocks) or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"softhebb: channels must be {len(blocks)} positive ints for {dataset}, got {channels!r}")
        blocks = tuple(replace(b, channels=c) for c, b in zip(channels, blocks))
    return SoftHebbNet(in_channels, blocks, key, seed)
