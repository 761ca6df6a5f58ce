"""Triangle activation (Coates, Lee & Ng 2011), used as the forward nonlinearity by Miconi 2021
and, with a power, by SoftHebb (Journe et al. 2023): relu(u - mean_c u) ** power.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._channels import channel_axis


def triangle(u: torch.Tensor, power: float = 1.0, axis: int = 1) -> torch.Tensor:
    """relu(u - mean of u over the channels at ``axis``) ** power (Coates et al. 2011)."""
    out = torch.relu(u - u.mean(dim=axis, keepdim=True))
    return out if power == 1 else out.pow(power)


class Triangle(nn.Module):
    """``Triangle(power)``: relu(u - mean over channels of u) ** power, as a layer of a model.

    channel_dim: axis of the channels (1 for conv, -1 for Linear outputs).
    """

    def __init__(self, power: float = 1.0, channel_dim: int = 1):
        super().__init__()
        p = float(power)
        if not (p > 0 and math.isfinite(p)):
            raise ValueError(f"Triangle: power must be a finite number > 0, got {power!r}")
        self.power = p
        self.channel_dim = channel_dim

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return triangle(u, self.power, channel_axis(u, self.channel_dim, "Triangle"))

    def extra_repr(self) -> str:
        return f"power={self.power}, channel_dim={self.channel_dim}"
