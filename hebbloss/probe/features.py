"""Capture pooled features of named layers with removable hooks."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from .pooling import Pool


def capture_features(
    model: nn.Module,
    layers,
    images: torch.Tensor,
    batch_size: int = 256,
    pool: Pool = "quadrants",
    device: Optional[Union[str, torch.device]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> Dict[str, torch.Tensor]:
    """Run ``model`` in eval mode under no_grad over ``images`` (uint8 or float) and return, for each layer
    chosen by ``layers`` (names, globs, regexes, types: hebbloss.select_layers), its pooled output [N, D]."""
    raise NotImplementedError
