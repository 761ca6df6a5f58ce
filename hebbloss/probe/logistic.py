"""Logistic-regression probe trained with a stock optimizer, after the SoftHebb recipe (Journe et al. 2023):
standardised features, dropout 0.5, one linear layer, cross-entropy, Adam (lr 1e-3) with a step schedule."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

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
    num_classes: Optional[int] = None,
    step_size: Optional[int] = None,
    gamma: float = 0.5,
    seed: int = 0,
) -> ProbeResult:
    """Train and test accuracy of a linear softmax readout of standardised features: dropout, Linear,
    cross-entropy, torch.optim.Adam(lr) and StepLR(step_size, default epochs // 3, gamma) per epoch.
    Runs on the features' device; ``seed`` fixes initialisation, shuffling and dropout."""
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got train {tuple(train_x.shape)} and test {tuple(test_x.shape)}")
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0] or train_x.shape[0] == 0:
        raise ValueError("features and labels differ in number of samples, or there are none")
    if epochs < 1 or not 0 <= dropout < 1:
        raise ValueError(f"need epochs >= 1 and 0 <= dropout < 1, got epochs={epochs}, dropout={dropout}")
    k = num_classes if num_classes is not None else int(max(train_y.max(), test_y.max() if test_y.numel() else 0)) + 1
    device = train_x.device
    mean = train_x.mean(0)
    std = train_x.std(0, unbiased=False)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-30), std, torch.ones_like(std))
    norm = lambda x: (x.to(device).float() - mean) / std  # noqa: E731
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(train_x.shape[1], k)).to(device)
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size or max(1, epochs // 3), gamma=gamma)
        g = torch.Generator().manual_seed(seed)
        labels = train_y.to(device).long()
        for _ in range(epochs):
            head.train()
            for idx in torch.randperm(train_x.shape[0], generator=g).split(batch_size):
                loss = nn.functional.cross_entropy(head(norm(train_x[idx])), labels[idx.to(device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    head.eval()

    def acc(x, y):
        if x.shape[0] == 0:
            return float("nan")
        with torch.no_grad():
            pred = torch.cat([head(norm(x[i:i + 8192])).argmax(1).cpu() for i in range(0, x.shape[0], 8192)])
        return float((pred == y.cpu()).float().mean())

    return ProbeResult(acc(train_x, train_y), acc(test_x, test_y), None)
