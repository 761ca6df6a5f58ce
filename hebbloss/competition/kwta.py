"""k-winners-take-all post-synaptic signal with homeostatic thresholds (Miconi 2021).

At each (sample, position) the k channels with the largest z - theta_c win. Their post signal is
1 (``binary=True``, Miconi's plastic signal) or z; every other channel gets 0. In training mode
the thresholds follow the homeostasis rule theta_c += mu * (rate_c - k/C), rate_c being the
fraction of (sample, position) pairs that channel c won in this call, so that every channel ends
up winning k/C of the time. In eval mode (probing, evaluation) nothing changes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._channels import channel_axis, per_channel


def kwta_winners(z: torch.Tensor, k: int, axis: int, threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The channel indices of the k largest of z - threshold along ``axis`` (k along ``axis``, the
    other dimensions as z's)."""
    shifted = z if threshold is None else z - per_channel(threshold.to(z.dtype), z, axis)
    # max() finds one winner several times faster than topk() on CPU (same indices but for exact ties)
    return shifted.max(dim=axis, keepdim=True).indices if k == 1 else shifted.topk(k, dim=axis).indices


def kwta_mask(z: torch.Tensor, k: int, axis: int, threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 where a channel is among the k largest of z - threshold along ``axis``, else 0 (Miconi 2021)."""
    return winners_mask(z, kwta_winners(z, k, axis, threshold), axis)


def winners_mask(like: torch.Tensor, winners: torch.Tensor, axis: int) -> torch.Tensor:
    """A tensor shaped and typed as ``like``: 1 at the channel indices ``winners`` (:func:`kwta_winners`)
    along ``axis``, else 0 (the k-WTA mask from winners already found)."""
    return torch.zeros_like(like).scatter_(axis, winners, 1.0)


def adapt_thresholds(theta: torch.Tensor, winners: torch.Tensor, k: int, rate: float) -> None:
    """Homeostasis in place: theta_c += rate * (win rate of channel c - k/C) (Miconi 2021), the win rate
    being the fraction of positions (samples and places) at which c is among ``winners`` (the indices
    of :func:`kwta_winners`); counted, not averaged over a mask of the layer's size."""
    with torch.no_grad():
        channels, index = theta.numel(), winners.reshape(-1).to(theta.device)
        # scatter_add_ rather than bincount, whose output size depends on the data (a torch.compile graph break)
        counts = torch.zeros(channels, dtype=torch.promote_types(theta.dtype, torch.float32), device=theta.device)
        counts.scatter_add_(0, index, counts.new_ones(1).expand(index.numel()))  # exact up to 2**24 positions
        positions = max(index.numel() // k, 1)
        theta.add_((rate * (counts / positions - k / channels)).to(theta.dtype))


class KWTA(nn.Module):
    """k-WTA post signal: ``attach(model, rule="instar", post=KWTA(k=1, binary=True, homeostasis=3.0))``.

    k: winners per (sample, position), 1 <= k <= channels.
    binary: winners get 1 (Miconi's binarised plastic signal) instead of their z.
    homeostasis: mu of theta_c += mu * (rate_c - k/C); 0 keeps the thresholds at 0.
    num_channels: C, to create the thresholds now; otherwise ``attach`` calls :meth:`bind` with
        the layer's number of units, or the first call creates them.
    channel_dim: axis of the channels in the layer output (1 for conv, -1 for Linear, 0 for
        unbatched conv outputs).
    The thresholds are the buffer ``theta`` (saved in ``state_dict``; averaged over the ranks by
    ``Plasticity.sync`` under data parallelism, as named in ``synced_buffers``).
    """

    synced_buffers = ("theta",)  # competition state that hebbloss.distributed keeps equal on every rank

    def __init__(self, k: int = 1, binary: bool = False, homeostasis: float = 0.0,
                 num_channels: Optional[int] = None, channel_dim: int = 1):
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"KWTA: k must be a positive integer (the number of winners), got {k!r}")
        if not float(homeostasis) >= 0.0 or homeostasis == float("inf"):
            raise ValueError(f"KWTA: homeostasis (the threshold adaptation rate mu) must be finite and >= 0, got {homeostasis!r}")
        self.k = k
        self.binary = bool(binary)
        self.homeostasis = float(homeostasis)
        self.channel_dim = channel_dim
        self.register_buffer("theta", None)
        if num_channels is not None:
            self.bind(num_channels)

    def bind(self, num_units: int) -> None:
        """Create the [num_units] thresholds (zero); called by ``attach`` on its per-layer copy."""
        if self.k > num_units:
            raise ValueError(
                f"KWTA: k={self.k} winners but the layer has only {num_units} channels; choose k <= {num_units}"
            )
        if self.theta is not None and self.theta.numel() != num_units:
            raise ValueError(f"KWTA: already bound to {self.theta.numel()} channels, cannot bind to {num_units}")
        if self.theta is None:
            self.theta = torch.zeros(num_units)

    def reset_parameters(self) -> None:
        """Thresholds back to 0, e.g. when ``probe.baselines.random_copy`` re-draws a model using k-WTA."""
        if self.theta is not None:
            with torch.no_grad():
                self.theta.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        axis = channel_axis(z, self.channel_dim, "KWTA")
        channels = z.shape[axis]
        if self.theta is None:
            self.bind(channels)
        if self.theta.numel() != channels:
            raise ValueError(
                f"KWTA: thresholds for {self.theta.numel()} channels but the output has {channels} along "
                f"channel_dim={self.channel_dim} (shape {tuple(z.shape)}); check channel_dim"
            )
        if self.k > channels:
            raise ValueError(f"KWTA: k={self.k} winners but the output has only {channels} channels")
        theta = self.theta.to(z.device)
        winners = kwta_winners(z, self.k, axis, theta)
        mask = winners_mask(z, winners, axis)
        if self.training and self.homeostasis > 0:
            adapt_thresholds(self.theta, winners, self.k, self.homeostasis)
        return mask if self.binary else z * mask

    def extra_repr(self) -> str:
        n = None if self.theta is None else self.theta.numel()
        return f"k={self.k}, binary={self.binary}, homeostasis={self.homeostasis}, channels={n}, channel_dim={self.channel_dim}"
