"""Pooling of layer outputs into fixed-size feature vectors for linear probes.

Miconi (2021) reads out each layer after average pooling to 2x2 quadrants; global average pooling and
plain flattening are the other usual choices.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F

Pool = Union[str, int, Tuple[int, ...]]
_ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
POOLS = ("quadrants", "global", "flatten")


def check_pool(pool: Pool) -> None:
    """Raise ValueError unless ``pool`` is one of :data:`POOLS`, a positive int or a tuple of them."""
    if isinstance(pool, str):
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r} is not one of {POOLS} or an int grid size such as 2 or (2, 2)")
        return
    sizes = pool if isinstance(pool, tuple) else (pool,)
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(f"pool={pool!r} is not one of {POOLS} or a positive int grid size such as 2 or (2, 2)")


def pool_features(output: torch.Tensor, pool: Pool = "quadrants", channel_dim: int = 1) -> torch.Tensor:
    """One feature vector per sample, [N, D], from a layer output [N, C, *spatial].

    "quadrants": adaptive average pooling to 2 per spatial dimension (2x2 for images), "global":
    average over space, "flatten": every value, an int or tuple: adaptive average pooling to that grid.
    ``channel_dim`` says where the channels are (-1 for token outputs [N, T, D]); outputs [N, D] pass through.
    """
    check_pool(pool)
    if output.dim() < 2:
        raise ValueError(f"a layer output of shape {tuple(output.shape)} has no feature dimension; probe another layer")
    if output.dim() == 2:
        return output
    if channel_dim % output.dim() != 1:
        output = output.movedim(channel_dim, 1)
    spatial = output.dim() - 2
    if pool == "flatten":
        return output.flatten(1)
    if pool == "global":
        return output.mean(dim=tuple(range(2, output.dim())))
    size = 2 if pool == "quadrants" else pool
    if spatial not in _ADAPTIVE:
        raise ValueError(f"cannot grid-pool a {spatial}-d output {tuple(output.shape)}; use pool='global' or 'flatten'")
    sizes = size if isinstance(size, tuple) else (size,) * spatial
    if len(sizes) != spatial:
        raise ValueError(f"pool={pool!r} gives {len(sizes)} sizes but the output {tuple(output.shape)} has {spatial} spatial dims")
    return _ADAPTIVE[spatial](output, sizes).flatten(1)
