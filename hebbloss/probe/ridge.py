"""Closed-form ridge regression on one-hot targets as a linear probe, streamed via X^T X and X^T Y."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .result import ProbeResult


class RidgeAccumulator:
    """Accumulates X^T X, X^T Y, sum X, sum X^2 batch by batch so X is never held whole."""

    def __init__(self, num_features: int, num_classes: int, dtype=torch.float64, device=None):
        raise NotImplementedError


def fit_ridge(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    alpha: Optional[Union[float, Sequence[float]]] = None,
    num_classes: Optional[int] = None,
) -> ProbeResult:
    """Standardise features, fit ridge regression to one-hot labels and report train/test accuracy."""
    raise NotImplementedError
