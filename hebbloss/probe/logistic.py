"""Logistic-regression probe trained with a stock optimizer, after the SoftHebb recipe (Journe et al. 2023):
standardised features, dropout 0.5, one linear layer, cross-entropy, Adam (lr 1e-3) with a step schedule."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from .feature_cache import FeatureCache
from .result import ProbeResult

STATS_BATCH = 8192  # rows per batch when the feature statistics are streamed from a FeatureCache


def _shape(x: Union[torch.Tensor, FeatureCache]) -> Tuple[int, ...]:
    return (len(x), x.dim) if isinstance(x, FeatureCache) else tuple(x.shape)


def _mean_std(x: Union[torch.Tensor, FeatureCache]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and population std of a tensor, or of a FeatureCache streamed in two float64 passes."""
    if isinstance(x, torch.Tensor):
        return x.mean(0), x.std(0, unbiased=False)
    total = torch.zeros(x.dim, dtype=torch.float64)
    for _, rows in x.batches(STATS_BATCH, dtype=torch.float64):
        total += rows.sum(0)
    mean = total / len(x)
    total.zero_()
    for _, rows in x.batches(STATS_BATCH, dtype=torch.float64):
        total += (rows - mean).square().sum(0)
    return mean.float(), (total / len(x)).sqrt().float()


def fit_logistic(
    train_x: Union[torch.Tensor, FeatureCache],
    train_y: torch.Tensor,
    test_x: Union[torch.Tensor, FeatureCache],
    test_y: torch.Tensor,
    epochs: int = 50,
    dropout: float = 0.5,
    lr: float = 1e-3,
    batch_size: int = 64,
    num_classes: Optional[int] = None,
    step_size: Optional[int] = None,
    gamma: float = 0.5,
    seed: int = 0,
) -> ProbeResult:
    """Train and test accuracy of a linear softmax readout of standardised features: dropout, Linear,
    cross-entropy, torch.optim.Adam(lr) and StepLR(step_size, default epochs // 3, gamma) per epoch.
    Runs on the features' device; ``seed`` fixes initialisation, shuffling and dropout. The features may
    be :class:`FeatureCache` s (e.g. memory-mapped from disk): batches are read from them, on the CPU."""
    shape, test_shape = _shape(train_x), _shape(test_x)
    if len(shape) != 2 or len(test_shape) != 2 or shape[1] != test_shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got train {shape} and test {test_shape}")
    if shape[0] != train_y.shape[0] or test_shape[0] != test_y.shape[0] or shape[0] == 0:
        raise ValueError("features and labels differ in number of samples, or there are none")
    if epochs < 1 or not 0 <= dropout < 1:
        raise ValueError(f"need epochs >= 1 and 0 <= dropout < 1, got epochs={epochs}, dropout={dropout}")
    k = num_classes if num_classes is not None else int(max(train_y.max(), test_y.max() if test_y.numel() else 0)) + 1
    device = torch.device("cpu") if isinstance(train_x, FeatureCache) else train_x.device
    mean, std = _mean_std(train_x)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-30), std, torch.ones_like(std))
    norm = lambda x: (x.to(device).float() - mean) / std  # noqa: E731
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(shape[1], k)).to(device)
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size or max(1, epochs // 3), gamma=gamma)
        g = torch.Generator().manual_seed(seed)
        labels = train_y.to(device).long()
        for _ in range(epochs):
            head.train()
            for idx in torch.randperm(shape[0], generator=g).split(batch_size):
                loss = nn.functional.cross_entropy(head(norm(train_x[idx])), labels[idx.to(device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    head.eval()

    def acc(x, y):
        n = _shape(x)[0]
        if n == 0:
            return float("nan")
        with torch.no_grad():
            pred = torch.cat([head(norm(x[i:i + 8192])).argmax(1).cpu() for i in range(0, n, 8192)])
        return float((pred == y.cpu()).float().mean())

    return ProbeResult(acc(train_x, train_y), acc(test_x, test_y), None)
