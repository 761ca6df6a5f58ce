"""Logistic-regression probe trained with a stock optimizer (SoftHebb recipe, Journe et al. 2023)."""
from __future__ import annotations

import torch

from .result import ProbeResult


def fit_logistic(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    epochs: int = 50,
    dropout: float = 0.5,
    lr: float = 1e-3,
    batch_size: int = 64,
    num_classes=None,
) -> ProbeResult:
    """Standardised features -> dropout -> linear layer, trained with Adam and a StepLR schedule."""
    raise NotImplementedError
