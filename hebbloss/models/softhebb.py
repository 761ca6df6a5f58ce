"""The SoftHebb convolutional networks of Journe et al. 2023, "Hebbian deep learning without
feedback" (ICLR 2023; 80.3% CIFAR-10 linear probe).

Each block: BatchNorm without affine parameters -> conv (reflect padding, no bias) ->
Triangle(power) -> pooling. Plasticity: the SoftHebb rule dW = y (x - u W) driven by a soft-WTA
with anti-Hebbian losers (inverse temperature per layer); updates max-abs normalised per layer
and scaled per neuron by |norm(W_c) - 1| ** power_lr (0.5; ImageNet 0.75); weights initialised at
radius 25; SGD with batch 10 (STL-10: 32) for one epoch. Layer settings are the authors' published
presets (presets.json of NeuromorphicComputing/SoftHebb), at depth 1, 2 and 3 on CIFAR-10, 3 and 4
on STL-10 and 5 on ImageNet; ``model.recipe.readout`` is the paper's linear readout.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..init import init_radius
from ..competition import SoftWTA, Triangle
from .blocks import MaxPool2d
from .recipe import LayerRecipe, Recipe

PAPER = "Journe, Garcia Rodriguez, Guo & Moraitis 2023, Hebbian deep learning without feedback, ICLR"
INIT_RADIUS = 25.0  # presets.json, layer/CNN/default "radius": 25 (NeuromorphicComputing/SoftHebb)
REPO = "NeuromorphicComputing/SoftHebb"


@dataclass(frozen=True)
class Block:
    """One SoftHebb block: conv width/kernel/padding, Triangle power, pooling, beta and eta.

    pre_triangle: the authors' ``e1`` flag (hebbconv.py, HebbHardConv2d.forward): Triangle(1) on
    the conv output before the soft-WTA and before the block's own Triangle(power).
    """

    channels: int
    kernel: int
    padding: int
    power: float
    pool: Tuple[str, int, int, int]   # ("max" | "avg", kernel, stride, padding)
    inverse_temperature: float
    lr: float
    pre_triangle: bool = False


# The authors' presets, presets.json "model" of NeuromorphicComputing/SoftHebb, each Hebbian block
# "softkrotov-c{channels}-k{kernel}-p{padding}-...-t{inverse temperature}-lr{eta}-lp{power_lr}-e{pre_triangle}"
# (parsed by utils.py generate_config) with its "pool" ("max_4_2_1") and "activation" ("triangle_0.7").
# Their names count the linear classifier: "4SoftHebbCnnCIFAR" has 3 Hebbian blocks.
CIFAR10_DEPTH1 = (  # 2SoftHebbCnnCIFAR
    Block(96, 5, 2, 0.7, ("avg", 4, 2, 1), 1.0, 0.08),
)
CIFAR10_DEPTH2 = (  # 3SoftHebbCnnCIFAR (its second block has e1)
    Block(96, 5, 2, 0.7, ("avg", 4, 2, 1), 1.0, 0.08),
    Block(384, 3, 1, 1.4, ("max", 4, 2, 1), 0.65, 0.005, pre_triangle=True),
)
CIFAR10 = (  # 4SoftHebbCnnCIFAR (the paper's 80.3%)
    Block(96, 5, 2, 0.7, ("max", 4, 2, 1), 1.0, 0.08),
    Block(384, 3, 1, 1.4, ("max", 4, 2, 1), 0.65, 0.005),
    Block(1536, 3, 1, 1.0, ("avg", 2, 2, 0), 0.25, 0.01),
)
STL10_DEPTH3 = (  # 4SoftHebbCnnSTL
    Block(96, 5, 2, 0.7, ("avg", 4, 2, 1), 1.0, 0.08),
    Block(384, 3, 1, 1.4, ("max", 4, 2, 1), 0.65, 0.005),
    Block(1536, 3, 1, 1.0, ("avg", 4, 2, 1), 0.45, 0.01),
)
STL10 = (  # 5SoftHebbCnnSTL (the paper's 76.2%)
    Block(96, 5, 2, 0.7, ("avg", 4, 2, 1), 1.0, 0.08),
    Block(384, 3, 1, 0.7, ("max", 4, 2, 1), 0.65, 0.005),
    Block(1536, 3, 1, 1.4, ("avg", 4, 2, 1), 0.45, 0.01),
    Block(6144, 3, 1, 1.0, ("avg", 2, 2, 0), 0.25, 0.01),
)
IMAGENET = (  # 6SoftHebbCnnImNet (the paper's 27.3%; README, Table 2); no "lp": power_lr 0.75
    Block(48, 5, 2, 0.7, ("max", 4, 2, 1), 1.1, 0.08),
    Block(192, 3, 1, 0.7, ("max", 4, 2, 1), 0.7, 0.01),
    Block(768, 3, 1, 0.7, ("max", 4, 2, 1), 0.5, 0.01),
    Block(3072, 3, 1, 1.4, ("max", 4, 2, 1), 0.4, 0.01),
    Block(12288, 3, 1, 1.0, ("avg", 2, 2, 0), 0.25, 0.01),
)
CIFAR_DEPTHS = {1: CIFAR10_DEPTH1, 2: CIFAR10_DEPTH2, 3: CIFAR10}
# README "Figure 3 / STL10": depths 1 and 2 reuse the CIFAR presets, 3 and 4 the STL ones.
STL10_DEPTHS = {1: CIFAR10_DEPTH1, 2: CIFAR10_DEPTH2, 3: STL10_DEPTH3, 4: STL10}

# The paper's readout (train.py, supervised phase: Adam(lr=lr_sup 0.001), utils.py CustomStepLR:
# lr halved at 20/35/50/60/70/80/90 % of the epochs for >= 50 epochs, at 50/75 % for 20-49) on the
# flattened output of the last block, after dropout (the classifier block's "dropout").
HALVED_AT = (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Variant:
    """One dataset's settings: input channels and size, Hebbian batch / epochs / power_lr (the
    authors' --dataset-unsup preset), readout epochs / batch / classes / dropout / augmentation
    (--dataset-sup preset and the classifier block), the depths with presets and the default depth."""

    in_channels: int
    image_size: int
    depths: dict
    default_depth: int
    batch_size: int = 10
    power_lr: float = 0.5
    readout_epochs: int = 50
    readout_batch: int = 64
    classes: int = 10
    dropout: object = 0.5          # a number, or {depth: number}
    readout_augment: Optional[str] = None
    source: str = ""


VARIANTS = {
    "cifar10": Variant(3, 32, CIFAR_DEPTHS, 3,
                       source="--dataset-unsup CIFAR10_1 (batch 10, 1 epoch) --dataset-sup CIFAR10_50 (batch 64, 50 epochs)"),
    "cifar100": Variant(3, 32, CIFAR_DEPTHS, 3, classes=100,
                        source="--dataset-unsup CIFAR100_1 (batch 10, 1 epoch) --dataset-sup CIFAR100_50 (batch 64, 50 epochs)"),
    "mnist": Variant(1, 28, CIFAR_DEPTHS, 3, source="none: the authors publish no CNN preset for MNIST"),
    "fashionmnist": Variant(1, 28, CIFAR_DEPTHS, 3, source="none: the authors publish no CNN preset for Fashion-MNIST"),
    "stl10": Variant(3, 96, STL10_DEPTHS, 4, batch_size=32, readout_epochs=100, dropout={3: 0.4},
                     readout_augment="crop4-reflect+hflip",
                     source="--dataset-unsup STL10_unlabel (100,000 unlabeled images, batch 32, 1 epoch) "
                            "--dataset-sup STL10_100aug (batch 64, 100 epochs, RandomCrop(96, padding=4, reflect) + flip)"),
    "imagenet": Variant(3, 160, {5: IMAGENET}, 5, power_lr=0.75, readout_epochs=200, readout_batch=32, classes=1000,
                        readout_augment="random-resized-crop+hflip",
                        source="--dataset-unsup ImageNet_1160 (128,116 images at 160x160, RandomSizedCrop + flip, "
                               "batch 10, 1 epoch) --dataset-sup ImageNet_200aug160 (batch 32, 200 epochs)"),
}
PRESET_NAMES = {("cifar", 1): "2SoftHebbCnnCIFAR", ("cifar", 2): "3SoftHebbCnnCIFAR", ("cifar", 3): "4SoftHebbCnnCIFAR",
                ("stl10", 1): "2SoftHebbCnnCIFAR", ("stl10", 2): "3SoftHebbCnnCIFAR", ("stl10", 3): "4SoftHebbCnnSTL",
                ("stl10", 4): "5SoftHebbCnnSTL", ("imagenet", 5): "6SoftHebbCnnImNet"}


def pooled_size(size: int, blocks: Sequence[Block]) -> int:
    """Height (= width) of the last block's output for ``size`` x ``size`` inputs (the convs keep
    the size; each pooling maps h to floor((h + 2 p - k) / s) + 1)."""
    for b in blocks:
        _, k, st, p = b.pool
        size = (size + 2 * p - k) // st + 1
    return size


def _pool(spec):
    kind, kernel, stride, padding = spec
    return MaxPool2d(kernel, stride, padding) if kind == "max" else nn.AvgPool2d(kernel, stride, padding)


def make_recipe(dataset: str, blocks: Sequence[Block], in_channels: int, depth: Optional[int] = None) -> Recipe:
    """The recipe of SoftHebb's network ``blocks`` for ``dataset`` (a key of :data:`VARIANTS`;
    another name gets the CIFAR-10 settings): per-layer soft-WTA and eta, the Hebbian batch and
    epochs, power_lr, the paper's readout, and the deviations from the authors' code in ``notes``."""
    v = VARIANTS.get(dataset, VARIANTS["cifar10"])
    depth = len(blocks) if depth is None else depth
    family = "cifar" if v.depths is CIFAR_DEPTHS else dataset
    preset = PRESET_NAMES.get((family, depth))
    layers = {}
    for i, b in enumerate(blocks, start=1):
        post = SoftWTA(b.inverse_temperature)
        layers[f"conv{i}"] = LayerRecipe("softhebb", nn.Sequential(Triangle(1.0), post) if b.pre_triangle else post, b.lr)
    side = pooled_size(v.image_size, blocks)
    dropout = v.dropout.get(depth, 0.5) if isinstance(v.dropout, dict) else v.dropout
    notes = {
        "input": "images in [0, 1]; the first BatchNorm standardises them"
                 + (" (the authors' ImageNet loader also normalises with the ImageNet mean/std)" if dataset == "imagenet" else ""),
        "variant": f"{dataset}, depth {depth}" + (" (CIFAR-10 layer settings on 1-channel input)" if in_channels == 1 else ""),
        "preset": (f"{REPO} presets.json model {preset!r}" if preset else "no preset of the authors at this depth")
                  + "; " + v.source,
        "lr schedule": "each neuron's rate is eta * |norm(W_c) - 1| ** power_lr (the authors' 'adaptive' lr); their "
                       "'lr_decay: linear' scheduler is not used in that mode, so none here either",
    }
    if in_channels == 1:
        notes["mnist"] = ("the authors publish no SoftHebb CNN preset for MNIST / Fashion-MNIST (presets.json has only the "
                          "MLP '2SoftMlpMNIST'; README lists no CNN MNIST command): the CIFAR-10 presets, Hebbian "
                          "batch 10 / 1 epoch and CIFAR-10's readout (50 epochs, batch 64) are used on the 1-channel "
                          "28x28 images")
    if any(b.pre_triangle for b in blocks):
        notes["pre_triangle"] = ("blocks with the authors' e1 flag get Triangle(1) before their Triangle(power) and before "
                                 "the soft-WTA (the post signal here); the authors also use Triangle(1)(u) in the rule's "
                                 "y * u decay term, where the softhebb rule here uses the conv output u")
    if dataset == "stl10":
        notes["data"] = "Hebbian phase on the 100,000 unlabeled STL-10 images; readout on the 5,000 labeled ones"
    if dataset == "imagenet":
        notes["data"] = ("Hebbian phase on a 10% subset (128,116 images) at 160x160 with RandomSizedCrop + flip (the "
                         "authors' ImageNet_1160); no augmentation is declared for it here (recipe.augment is None)")
    return Recipe(
        name=f"softhebb-{dataset}" + ("" if depth == v.default_depth else f"-depth{depth}"),
        layers=layers,
        batch_size=v.batch_size,
        epochs=1,
        softhebb_power=v.power_lr,
        paper=PAPER,
        notes=notes,
        readout={
            "method": "dropout + linear", "layer": f"pool{len(blocks)}", "flatten": True,
            "features": blocks[-1].channels * side * side, "image_size": v.image_size,
            "dropout": dropout, "optimizer": "Adam", "lr": 1e-3, "batch_size": v.readout_batch,
            "epochs": v.readout_epochs, "lr_halved_at": list(HALVED_AT), "classes": v.classes,
            "augment": v.readout_augment,
        },
    )


class SoftHebbNet(nn.Module):
    """The network (no classifier: probe ``feature_layers`` linearly; the paper reads the last
    one, flattened: ``recipe.readout``). See :func:`softhebb`."""

    def __init__(self, in_channels: int, blocks: Sequence[Block], dataset: str, seed: Optional[int] = 0,
                 depth: Optional[int] = None):
        super().__init__()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        width = in_channels
        for i, b in enumerate(blocks, start=1):
            conv = nn.Conv2d(width, b.channels, b.kernel, padding=b.padding, padding_mode="reflect", bias=False)
            init_radius(conv, INIT_RADIUS, generator=generator)
            setattr(self, f"bn{i}", nn.BatchNorm2d(width, affine=False))
            setattr(self, f"conv{i}", conv)
            if b.pre_triangle:
                setattr(self, f"pre{i}", Triangle(1.0))
            setattr(self, f"act{i}", Triangle(b.power))
            setattr(self, f"pool{i}", _pool(b.pool))
            width = b.channels
        self.num_blocks = len(blocks)
        self.plastic_layers = tuple(f"conv{i}" for i in range(1, len(blocks) + 1))
        self.feature_layers = tuple(f"pool{i}" for i in range(1, len(blocks) + 1))
        self.recipe = make_recipe(dataset, blocks, in_channels, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.num_blocks + 1):
            x = getattr(self, f"conv{i}")(getattr(self, f"bn{i}")(x))
            pre = getattr(self, f"pre{i}", None)
            x = getattr(self, f"pool{i}")(getattr(self, f"act{i}")(x if pre is None else pre(x)))
        return x


def softhebb(dataset: str = "cifar10", channels: Optional[Sequence[int]] = None, seed: Optional[int] = 0,
             depth: Optional[int] = None) -> SoftHebbNet:
    """SoftHebb's network for ``dataset`` at ``depth`` Hebbian blocks, with the authors' per-layer
    presets, ready for ``model.recipe.attach(model)``:

    - "cifar10", "cifar100" (and "mnist", "fashionmnist" on 1 channel): depth 1 (96), 2 (96-384)
      or 3 (96-384-1536, the default);
    - "stl10": depth 1 and 2 as CIFAR-10, 3 (96-384-1536) or 4 (96-384-1536-6144, the default);
    - "imagenet": depth 5 (48-192-768-3072-12288, at 160x160).

    channels: override the widths (same number of blocks; for quick tests).
    seed: fixes the initial weights (None: torch's global generator).
    """
    key = str(dataset).lower().replace("-", "").replace("_", "")
    if key not in VARIANTS:
        raise ValueError(f"softhebb: unknown dataset {dataset!r}; choose one of {', '.join(sorted(VARIANTS))}")
    v = VARIANTS[key]
    depth = v.default_depth if depth is None else depth
    if depth not in v.depths:
        raise ValueError(f"softhebb: depth={depth!r} has no preset for {dataset}; choose one of {', '.join(map(str, sorted(v.depths)))}")
    blocks = v.depths[depth]
    if channels is not None:
        channels = tuple(channels)
        if len(channels) != len(blocks) or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"softhebb: channels must be {len(blocks)} positive ints for {dataset} at depth {depth}, got {channels!r}")
        blocks = tuple(replace(b, channels=c) for c, b in zip(channels, blocks))
    return SoftHebbNet(v.in_channels, blocks, key, seed, depth)
