"""Soft winner-take-all post signal of SoftHebb (Journe et al. 2023, "Hebbian deep learning
without feedback", ICLR).

y = softmax(beta * u) over channels; with ``anti_hebbian`` the winner (argmax u) keeps +y and
every other channel gets -y, so losers are pushed away from the input (anti-Hebbian).

Softmax values below the smallest normal float (1.2e-38 in float32) are set to 0. A soft-WTA over many
channels makes such subnormal values in quantity (11 % of y in the SoftHebb network's first layer),
and on many x86 CPUs every product with a subnormal number takes a slow microcode path: the
weight-gradient convolution of the update then ran 3.1x slower (Xeon, 2026-12-04, benchmarks/speed.py).
What is set to 0 is below float32's resolution of the winner's value by 30 orders of magnitude.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._channels import channel_axis


def soft_wta(u: torch.Tensor, inverse_temperature: float, axis: int, anti_hebbian: bool = True) -> torch.Tensor:
    """softmax(beta*u) along ``axis``, subnormal values set to 0; with anti_hebbian, minus it for every
    non-winner (Journe et al. 2023)."""
    y = torch.softmax(_without_deep_tails(u, inverse_temperature, axis), dim=axis)
    tiny = torch.finfo(y.dtype).tiny  # subnormal values -> 0 (see the module docstring)
    y = torch.threshold(y, tiny, 0.0) if y.requires_grad else torch.threshold_(y, tiny, 0.0)
    if not anti_hebbian:
        return y
    # the winner's index: max's, which is argmax's (the first of equal values, NaN first) and on a CPU
    # takes ~half argmax's time along the channels of [N, C, H, W]. Every other unit gets -y: negate all,
    # then put the winners' +y back, where a winner mask and torch.where would take three more
    # activation-sized passes (SoftHebb network, batch 10, 1 thread: 19 -> 11 ms a step)
    winner = u.max(dim=axis, keepdim=True).indices
    if y.requires_grad:
        return torch.scatter(-y, axis, winner, y.gather(axis, winner))
    won = y.gather(axis, winner)
    return y.neg_().scatter_(axis, winner, won)


_WIDE_RANGE = (torch.float32, torch.float64, torch.bfloat16)


def _without_deep_tails(u: torch.Tensor, inverse_temperature: float, axis: int) -> torch.Tensor:
    """beta * u, where on a CPU without autograd, if some position spreads over more than -log(tiny),
    shifted by its maximum with every value below log(tiny) set to -inf: exp of those is below the
    smallest normal float, so their softmax value, which :func:`soft_wta` sets to 0 anyway, is 0 from the
    start and the softmax makes no subnormal numbers on the way (those values add nothing to a sum of at
    least 1). The same softmax, bit for bit; in the SoftHebb network's first layer (11 % of y subnormal)
    the softmax took 41 ms of a batch of 64 before and 12 ms after, the extremes, shift and mask 7 ms (Xeon,
    1 thread)."""
    x = u * inverse_temperature if inverse_temperature != 1.0 else u
    # not float16, whose smallest normal (6e-5) does change a float32 sum of 1
    if u.device.type != "cpu" or u.requires_grad or u.dtype not in _WIDE_RANGE or u.numel() == 0 \
            or torch.compiler.is_compiling():  # the test below would break a compiled graph
        return x
    # amax and amin: two vectorised passes, where aminmax's single one took 5x their time along NCHW channels
    high, low = x.amax(dim=axis, keepdim=True), x.amin(dim=axis, keepdim=True)
    cut = math.log(torch.finfo(x.dtype).tiny) - 0.01  # exp(cut) < tiny with room for exp's rounding
    if not bool(((high - low) > -cut).any()):
        return x
    x = x - high
    return torch.threshold_(x, cut, float("-inf"))


class SoftWTA(nn.Module):
    """SoftHebb's post signal: ``attach(model, rule="softhebb", post=SoftWTA(1.0))``.

    inverse_temperature: beta > 0 (the paper's 1 / 0.65 / 0.25 for its three CIFAR-10 layers).
    anti_hebbian: losers get -softmax (SoftHebb); False gives the plain soft-WTA.
    channel_dim: axis of the channels (1 for conv, -1 for Linear, 0 for unbatched conv outputs).
    Stateless: nothing to save.
    """

    def __init__(self, inverse_temperature: float = 1.0, anti_hebbian: bool = True, channel_dim: int = 1):
        super().__init__()
        beta = float(inverse_temperature)
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(
                f"SoftWTA: inverse_temperature must be a finite number > 0 (a temperature cannot be negative "
                f"or zero), got {inverse_temperature!r}"
            )
        self.inverse_temperature = beta
        self.anti_hebbian = bool(anti_hebbian)
        self.channel_dim = channel_dim

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        axis = channel_axis(u, self.channel_dim, "SoftWTA")
        return soft_wta(u, self.inverse_temperature, axis, self.anti_hebbian)

    def extra_repr(self) -> str:
        return f"inverse_temperature={self.inverse_temperature}, anti_hebbian={self.anti_hebbian}, channel_dim={self.channel_dim}"
