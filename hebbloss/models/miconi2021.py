"""The three-layer Hebbian convolutional network of Miconi 2021, "Multi-layer Hebbian networks
with modern deep learning frameworks" (arXiv:2107.01729).

Each block: per-sample standardisation -> conv (no padding, no bias) -> Triangle(z - theta) -> 2x2
average pooling, with 100 / 196 / 400 channels and 5 / 3 / 3 kernels. Plasticity: instar rule
driven by the binarised k-WTA (k=1) of the same z - theta (dense activations, sparse plasticity);
theta are homeostatic thresholds shared by the two (``HomeostaticTriangle``); random pruning of
0 / 99 / 99 % of the connections; unit-norm filters after every step; the first 200 batches only
adapt the thresholds; Hebbian batches randomly flipped left-right (``recipe.augment = "hflip"``).
Inputs are ZCA-whitened images as his code computes it (``recipe.zca = hebbloss.zca.MICONI2021``,
``hebbloss.zca.fit_zca`` on the training set).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .. import optim, prune
from ..zca import MICONI2021
from ..competition import triangle as triangle_fn
from ..competition.kwta import adapt_thresholds, kwta_winners, winners_mask
from .blocks import Standardize
from .recipe import LayerRecipe, Recipe

PAPER = "Miconi 2021, arXiv:2107.01729"
HOMEOSTASIS = 3.0                  # threshold adaptation rate (MUTHRES in the paper's code)
LEARNING_RATES = (1e-4, 1e-4, 1e-3)  # per batch of 100 with a summed loss (0.01/100, 0.01/100, 0.1/100)
WARMUP_STEPS = 200                 # batches that only adapt the thresholds (the paper's code steps after 200)


class HomeostaticTriangle(nn.Module):
    """Miconi 2021's nonlinearity: one set of per-channel thresholds theta for the forward pass and
    for plasticity.

    forward(z): Triangle(z - theta) (``triangle=False``: the binarised k-WTA of z - theta, the
        paper's ablation); in training mode it then moves theta_c += mu * (rate_c - k/C), rate_c the
        fraction of (sample, position) pairs where channel c is among the k winners of z - theta.
    winners(z): that binarised k-WTA of z - theta, the post signal of the instar rule. ``attach``
        calls it in the conv's forward hook, before forward, so both see the same theta, as in the
        paper's code; forward then reuses the winners it found when it gets the same z, unchanged,
        with theta unchanged (and finds them again otherwise). The thresholds are the buffer
        ``theta``, saved in the model's ``state_dict`` (and averaged over the ranks by
        ``Plasticity.sync`` under data parallelism: ``synced_buffers``).
    """

    synced_buffers = ("theta",)  # competition state that hebbloss.distributed keeps equal on every rank

    def __init__(self, num_channels: int, k: int = 1, homeostasis: float = HOMEOSTASIS, triangle: bool = True):
        super().__init__()
        self.k, self.homeostasis, self.triangle = k, float(homeostasis), bool(triangle)
        self.register_buffer("theta", torch.zeros(num_channels))
        self._found = None  # (z, z's version, theta's version, winners) from winners(), for the next forward

    def winners(self, z: torch.Tensor) -> torch.Tensor:
        found = kwta_winners(z, self.k, 1, self.theta)
        if not torch.compiler.is_compiling():  # a compiled graph finds them again: no tensor versions there
            self._found = (z, z._version, self.theta._version, found)  # z held: its memory cannot pass to another
        return winners_mask(z, found, 1)

    def _winners_of(self, found, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The k-WTA indices of u = z - theta: those in ``found`` (stashed by ``winners``) when it saw
        this very z (same memory, shape, strides and dtype, not written to since) under this very theta,
        else found anew."""
        if found is not None and not torch.compiler.is_compiling():
            seen, version, theta_version, indices = found
            if (seen.data_ptr() == z.data_ptr() and seen.shape == z.shape and seen.stride() == z.stride()
                    and seen.dtype == z.dtype and seen.device == z.device and z._version == version
                    and self.theta._version == theta_version):
                return indices
        return kwta_winners(u, self.k, 1)

    def reset_parameters(self) -> None:
        """Thresholds back to 0 (so a random-weight baseline does not inherit trained thresholds)."""
        with torch.no_grad():
            self.theta.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        adapt = self.training and self.homeostasis > 0
        u = z - self.theta.to(z.dtype).view(-1, *([1] * (z.dim() - 2)))
        found, self._found = self._found, None  # used by this forward at most, and never held past it
        winners = self._winners_of(found, z, u) if adapt or not self.triangle else None
        out = triangle_fn(u) if self.triangle else winners_mask(u, winners, 1)
        if adapt:
            adapt_thresholds(self.theta, winners, self.k, self.homeostasis)
        return out

    def extra_repr(self) -> str:
        return f"channels={self.theta.numel()}, k={self.k}, homeostasis={self.homeostasis}, triangle={self.triangle}"


class Winners:
    """The post signal ``HomeostaticTriangle.winners`` of one layer, as a plain callable: ``attach``
    uses it as is (it copies only post modules), so plasticity reads the model's own thresholds."""

    def __init__(self, act: HomeostaticTriangle, name: str):
        self.act, self.name = act, name

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.act.winners(z)

    def __repr__(self) -> str:
        return f"binarised k-WTA (k={self.act.k}) of z - {self.name}.theta"


def _check_triple(name, values, ok, what):
    values = tuple(values)
    if len(values) != 3 or not all(ok(v) for v in values):
        raise ValueError(f"miconi2021: {name} must be 3 {what}, got {values!r}")
    return values


class Miconi2021(nn.Module):
    """The network (no classifier: probe ``feature_layers`` linearly). See :func:`miconi2021`."""

    plastic_layers = ("conv1", "conv2", "conv3")
    feature_layers = ("pool1", "pool2", "pool3")

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (100, 196, 400),
                 kernels: Sequence[int] = (5, 3, 3), k: int = 1, triangle: bool = True,
                 pruning: Sequence[float] = (0.0, 0.99, 0.99), seed: Optional[int] = 0):
        super().__init__()
        channels = _check_triple("channels", channels, lambda c: isinstance(c, int) and c > 0, "positive ints")
        kernels = _check_triple("kernels", kernels, lambda c: isinstance(c, int) and c > 0, "positive ints")
        pruning = _check_triple("pruning", pruning, lambda a: isinstance(a, (int, float)) and 0 <= a < 1, "fractions in [0, 1)")
        if not isinstance(k, int) or not 1 <= k <= min(channels):
            raise ValueError(f"miconi2021: k={k!r} winners, but it must be an int in [1, {min(channels)}] (the smallest layer)")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        widths = (in_channels,) + channels
        for i in range(3):
            conv = nn.Conv2d(widths[i], widths[i + 1], kernels[i], bias=False)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.01)
            if pruning[i] > 0:
                prune.random_connections(conv, pruning[i], seed=None if seed is None else seed * 10 + i)
            optim.renormalize_filters(conv)
            act = HomeostaticTriangle(channels[i], k, HOMEOSTASIS, triangle)
            setattr(self, f"norm{i + 1}", Standardize())
            setattr(self, f"conv{i + 1}", conv)
            setattr(self, f"act{i + 1}", act)
            setattr(self, f"pool{i + 1}", nn.AvgPool2d(2))
        self.recipe = Recipe(
            name="miconi2021",
            layers={f"conv{i + 1}": LayerRecipe("instar", Winners(getattr(self, f"act{i + 1}"), f"act{i + 1}"),
                                                LEARNING_RATES[i])
                    for i in range(3)},
            batch_size=100,
            epochs=20,
            renormalize=True,
            warmup_steps=WARMUP_STEPS,
            paper=PAPER,
            augment="hflip",   # HebbGrad_Github.ipynb: transform_unlab = RandomHorizontalFlip + RandomCrop(32)
            zca=dict(MICONI2021),
            notes={
                "input": "ZCA-whitened images: hebbloss.zca.fit_zca(train_images, recipe.zca, generator) (his ZCA: "
                         "no per-pixel mean, Gram matrix / values per image, eps 1e-3, 9,000 flipped images)",
                "augmentation": "his loaders also apply RandomCrop(32) to 32x32 images (the identity) and flip the "
                                "images from which he collects the probe's train and test features "
                                "(transform_test = transform_train); recipe.augment covers the Hebbian batches only",
                "thresholds": "k-WTA thresholds live in the model (actN.theta) and adapt in training mode, also "
                              "during the warm-up; the paper's code also adapts them while collecting probe features",
                "standardisation": "population std; the paper's code divides by the sample std (1.0002x for 3x32x32)",
                "ablations": f"triangle={triangle}, pruning={pruning}",
            },
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 4):
            x = getattr(self, f"pool{i}")(getattr(self, f"act{i}")(getattr(self, f"conv{i}")(getattr(self, f"norm{i}")(x))))
        return x


def miconi2021(in_channels: int = 3, triangle: bool = True, pruning: bool = True, k: int = 1,
               channels: Sequence[int] = (100, 196, 400), seed: Optional[int] = 0) -> Miconi2021:
    """Miconi 2021's network, ready for ``model.recipe.attach(model)``.

    triangle: Triangle(z - theta) forward (dense activations); False is the paper's ablation where
        the binarised k-WTA of z - theta drives the forward pass too.
    pruning: remove 0 / 99 / 99 % of the connections of layers 1 / 2 / 3; False is the ablation.
    seed: fixes the initial weights and the pruning masks (None: torch's global generator).
    channels: 100 / 196 / 400 in the paper (smaller for quick tests).
    """
    amounts = (0.0, 0.99, 0.99) if pruning else (0.0, 0.0, 0.0)
    return Miconi2021(in_channels, channels, (5, 3, 3), k, triangle, amounts, seed)
