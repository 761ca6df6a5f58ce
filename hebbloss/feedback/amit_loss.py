"""Amit's last-layer cost whose derivative is a local Hebbian update (Amit 2019, "Deep learning
with asymmetric connections and Hebbian updates", Frontiers in Computational Neuroscience).

For outputs h of C classes and label y:
    L = (1 - h_y)_+ + mu / (C - 1) * sum_{c != y} (1 + h_c)_+
dL/dh_c is -1 for the true class while h_y < 1, +mu/(C-1) for another class while h_c > -1, else 0:
a target that is a fixed function of the label and the unit's own output.
The defaults are his code's (github.com/yaliamit/URFB@008757f, Conv_net_gpu.py ``recreate_network``,
scope 'loss'): mu is his ``off_class_fac`` (1. in every _pars file), the margin is 1 (``hinge:1.``),
and the cost is averaged over the batch (``tf.reduce_mean``).
"""
from __future__ import annotations

import torch
from torch import nn


def amit_hinge(h: torch.Tensor, target: torch.Tensor, mu: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Amit's hinge cost of outputs ``h`` [N, C] for labels ``target`` [N] (see module docstring)."""
    if h.dim() != 2 or h.shape[1] < 2:
        raise ValueError(f"AmitHingeLoss expects outputs of shape [N, C] with C >= 2 classes, got {tuple(h.shape)}")
    if target.dim() != 1 or target.shape[0] != h.shape[0] or target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"AmitHingeLoss expects integer labels of shape [{h.shape[0]}], got {target.dtype} {tuple(target.shape)}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= h.shape[1]):
        raise ValueError(f"labels must lie in [0, {h.shape[1] - 1}], got range [{int(target.min())}, {int(target.max())}]")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    true = nn.functional.one_hot(target.long(), h.shape[1]).to(torch.bool)
    h_y = h[true]
    others = torch.relu(1 + h).masked_fill(true, 0).sum(dim=1)
    loss = torch.relu(1 - h_y) + mu / (h.shape[1] - 1) * others
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


class AmitHingeLoss(nn.Module):
    """nn.Module form of :func:`amit_hinge`: ``AmitHingeLoss(mu)(outputs, labels)``."""

    def __init__(self, mu: float = 1.0, reduction: str = "mean"):
        super().__init__()
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.mu, self.reduction = float(mu), reduction

    def forward(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return amit_hinge(h, target, self.mu, self.reduction)

    def extra_repr(self) -> str:
        return f"mu={self.mu}, reduction={self.reduction!r}"
