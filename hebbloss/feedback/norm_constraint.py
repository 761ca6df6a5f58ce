"""The weight-norm constraint of Moskovitz, Litwin-Kumar & Abbott (2018, "Feedback alignment in deep
convolutional networks", arXiv:1812.06488) as their benchmark implementation runs it (BioTorch,
Jimenez Sanfiz & Akrout 2021, ``biotorch/layers/fa_constructor``, option ``constrain_weights``):
each layer's forward weight keeps the Frobenius norm it had at initialisation,

    W <- W * ||W_0||_F / ||W||_F,

so that, without weight symmetry, the weights cannot grow without bound. BioTorch rescales before
every forward pass; rescaling after every optimizer step, as :func:`constrain_norms_after_step`
does, gives every forward pass the same weights.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _weight_of(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError(f"norm constraint: {type(module).__name__} has no weight matrix or filter bank to constrain")
    return weight


def frobenius_norms(modules: Iterable[nn.Module]) -> List[float]:
    """||W||_F of each module's weight, now (the norms to keep when called at initialisation)."""
    return [float(_weight_of(m).detach().double().norm()) for m in modules]


@torch.no_grad()
def constrain_norms(modules: Sequence[nn.Module], norms: Sequence[float], eps: float = 1e-12) -> None:
    """Rescale each module's weight in place to Frobenius norm ``norms[i]`` (W * n / ||W||_F); a weight
    that is all zeros is left as it is."""
    modules, norms = list(modules), list(norms)
    if len(modules) != len(norms):
        raise ValueError(f"norm constraint: {len(modules)} layers but {len(norms)} norms")
    for m, n in zip(modules, norms):
        weight = _weight_of(m)
        current = float(weight.detach().double().norm())
        if current > eps:
            weight.mul_(n / current)


def constrain_norms_after_step(optimizer: torch.optim.Optimizer, modules: Iterable[nn.Module],
                               norms: Optional[Sequence[float]] = None) -> RemovableHandle:
    """Register a step post-hook on ``optimizer`` that rescales each module's weight to its norm after
    every ``optimizer.step()`` (Moskovitz et al. 2018; BioTorch's ``constrain_weights``).

    norms: the Frobenius norms to keep; default the norms now (call it right after initialisation).
    Returns the removable handle. Every check runs before the hook is placed.
    """
    modules = list(modules)
    if not modules:
        raise ValueError("constrain_norms_after_step: no layers given")
    kept = frobenius_norms(modules) if norms is None else [float(n) for n in norms]
    if len(kept) != len(modules):
        raise ValueError(f"constrain_norms_after_step: {len(modules)} layers but {len(kept)} norms")
    for m, n in zip(modules, kept):
        _weight_of(m)
        if not (n > 0 and math.isfinite(n)):
            raise ValueError(f"constrain_norms_after_step: the norm of {type(m).__name__} must be a finite number > 0, got {n}")

    def hook(opt, args, kwargs):
        constrain_norms(modules, kept)

    return optimizer.register_step_post_hook(hook)

