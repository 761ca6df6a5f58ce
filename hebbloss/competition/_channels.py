"""Where the channels of a layer's output are, for the post-synaptic signals (Miconi 2021).

A conv output is [batch, channels, *spatial] (channel_dim=1); a Linear output is [..., units]
(channel_dim=-1). An unbatched conv output [channels, *spatial] needs channel_dim=0.
"""
from __future__ import annotations

import torch


def channel_axis(x: torch.Tensor, channel_dim: int, who: str) -> int:
    """``channel_dim`` as a non-negative axis of ``x``; a clear error when ``x`` has no such axis."""
    if not -x.dim() <= channel_dim < x.dim():
        raise ValueError(
            f"{who}: channel_dim={channel_dim} but the layer output has shape {tuple(x.shape)}; "
            "use channel_dim=1 for batched conv outputs, 0 for unbatched ones, -1 for Linear outputs"
        )
    return channel_dim % x.dim()


def per_channel(values: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A [C] vector shaped to broadcast along ``axis`` of ``x``."""
    shape = [1] * x.dim()
    shape[axis] = -1
    return values.reshape(shape)
