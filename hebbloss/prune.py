"""Fixed random pruning of the connections between layers (Miconi 2021: 99% of the weights of
layers 2 and 3 removed), built on ``torch.nn.utils.prune``.

Like ``torch.nn.utils.prune``, each function prunes ``module.<name>`` in place and returns the
module: the parameter becomes ``<name>_orig``, the fixed mask the buffer ``<name>_mask`` (both in
``state_dict``, so a save/load round trip keeps them), and ``<name> = <name>_orig * <name>_mask``
is recomputed before every forward. Pruned weights are therefore exactly zero whatever any
optimizer does to ``<name>_orig``; hebbloss rules update ``<name>_orig`` (masked by autograd).

    hebbloss.prune.random_connections(model.conv2, amount=0.99, seed=0)
    hebbloss.prune.random_channel_pairs(model.conv3, amount=0.5, seed=0)

Unit-norm filters after each step (``renormalize_filters``, ``renormalize_after_step``) are
optimizer extras: their home is :mod:`hebbloss.optim`; they stay importable from here.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .optim import renormalize_after_step, renormalize_filters  # noqa: F401  (their home is hebbloss.optim)


def _random_scores(shape, seed: Optional[int]) -> torch.Tensor:
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(shape, generator=generator)


def _drop_lowest(mask: torch.Tensor, scores: torch.Tensor, amount: float) -> torch.Tensor:
    """Zero the round(amount * n) entries of ``mask`` with the lowest scores (n = scores.numel())."""
    count = int(round(amount * scores.numel()))
    if count:
        drop = scores.reshape(-1).topk(count, largest=False).indices
        flat = torch.ones(scores.numel(), dtype=mask.dtype)
        flat[drop] = 0
        mask = mask * flat.reshape(scores.shape).to(mask.device)
    return mask


class RandomConnections(torch_prune.BasePruningMethod):
    """Remove a random fraction ``amount`` of the single weights, from a fixed seed."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: float, seed: Optional[int] = None):
        self.amount = amount
        self.seed = seed

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        return _drop_lowest(mask, _random_scores(t.shape, self.seed), self.amount)

    @classmethod
    def apply(cls, module, name, amount, seed=None):
        return super().apply(module, name, amount=amount, seed=seed)


class RandomChannelPairs(torch_prune.BasePruningMethod):
    """Remove a random fraction ``amount`` of the (dim 0, dim 1) channel pairs, whole kernels at once."""

    PRUNING_TYPE = "global"

    def __init__(self, amount: float, seed: Optional[int] = None):
        self.amount = amount
        self.seed = seed

    def compute_mask(self, t, default_mask):
        pairs = torch.ones(t.shape[:2], dtype=default_mask.dtype)
        pairs = _drop_lowest(pairs, _random_scores(t.shape[:2], self.seed), self.amount)
        pairs = pairs.reshape(*t.shape[:2], *([1] * (t.dim() - 2))).to(default_mask.device)
        return default_mask * pairs

    @classmethod
    def apply(cls, module, name, amount, seed=None):
        return super().apply(module, name, amount=amount, seed=seed)


def _check(module: nn.Module, name: str, amount, seed, min_dims: int) -> None:
    what = type(module).__name__
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not 0 <= float(amount) < 1:
        raise ValueError(f"pruning {what}.{name}: amount must be a fraction in [0, 1) (0.99 removes 99%), got {amount!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"pruning {what}.{name}: seed must be an integer or None, got {seed!r}")
    param = getattr(module, name + "_orig", None)
    if not isinstance(param, nn.Parameter):
        param = getattr(module, name, None)
    if not isinstance(param, nn.Parameter):
        raise ValueError(f"pruning {what}: it has no parameter '{name}' to prune; pass name=... (e.g. 'weight')")
    if param.dim() < min_dims:
        raise ValueError(f"pruning {what}.{name}: channel pairs need a weight with >= {min_dims} dims, got shape {tuple(param.shape)}")


def random_connections(module: nn.Module, amount: float, seed: Optional[int] = None, name: str = "weight") -> nn.Module:
    """Prune a fixed random fraction ``amount`` in [0, 1) of the single connections of ``module.<name>``
    (Miconi 2021); ``seed`` fixes the mask (None: torch's global generator). Returns the module."""
    _check(module, name, amount, seed, 1)
    RandomConnections.apply(module, name, float(amount), seed)
    return module


def random_channel_pairs(module: nn.Module, amount: float, seed: Optional[int] = None, name: str = "weight") -> nn.Module:
    """Prune a fixed random fraction ``amount`` in [0, 1) of the (output, input) channel pairs of a
    conv weight (whole kernels; for transposed convs, (input, output) pairs). Returns the module."""
    _check(module, name, amount, seed, 2)
    RandomChannelPairs.apply(module, name, float(amount), seed)
    return module
