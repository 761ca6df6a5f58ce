"""Pooling of layer outputs into fixed-size feature vectors (Miconi 2021 probes 2x2 quadrants)."""
from __future__ import annotations

from typing import Union

import torch

Pool = Union[str, int, tuple]


def pool_features(output: torch.Tensor, pool: Pool = "quadrants") -> torch.Tensor:
    """[N, C, *spatial] -> [N, D]: "quadrants" (adaptive average to 2x2), "global" (average over space),
    "flatten", or an int / tuple grid for adaptive average pooling. [N, D] outputs pass through."""
    raise NotImplementedError
