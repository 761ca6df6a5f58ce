"""Amit's stabilisers for learning with asymmetric feedback (Amit 2019, "Deep learning with
asymmetric connections and Hebbian updates", Frontiers in Computational Neuroscience), as his code
runs them (github.com/yaliamit/URFB at commit 008757f, January 2019):

- :class:`ClippedRamp`: the only nonlinearity, clip(scale * z, -1, 1), whose derivative is
  ``scale`` where the output is strictly inside (-1, 1) and 0 where it saturates
  (Conv_layers.py, ``conv_layer`` / ``fully_connected_layer`` forward, ``grad_conv_layer`` /
  ``grad_fully_connected`` backward; ``nonlin_scale: .5`` in every _pars file);
- :class:`BackwardClip`: the input gradient of a layer is clipped, clip(bscale * g, -1, 1)
  (same functions, ``bscale`` = ``b_nonlin_scale``: 0, i.e. off, in _pars/deepernet*.txt and .5 in
  _pars/simpnet.txt);
- :func:`clip_weights` / :func:`clip_weights_after_step`: after each update, W (and the feedback
  weights B) are clipped to +/- 1.5 times the Glorot uniform bound sqrt(6 / (fan_in + fan_out))
  (Conv_layers.py ``comp_lim``; Conv_net_gpu.py ``update_only_non_zero``, which clips W and R).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .modes import FEEDBACK_WEIGHT

WEIGHT_CLIP_FACTOR = 1.5  # Conv_layers.py, comp_lim: ``return 1.5*lim``
NONLIN_SCALE = 0.5  # _pars/*.txt: ``nonlin_scale:.5``


class _Ramp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, scale):
        out = torch.clamp(scale * z, -1.0, 1.0)
        ctx.scale = scale
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.where(out.abs() == 1.0, torch.zeros_like(grad), grad * ctx.scale), None


class ClippedRamp(nn.Module):
    """Amit's clipped ramp clip(scale * z, -1, 1); backward: scale * grad where |output| < 1, else 0
    (his code zeroes the derivative where the output equals +/-1, so also exactly at the corner)."""

    def __init__(self, scale: float = NONLIN_SCALE):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"ClippedRamp: scale must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _Ramp.apply(z, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class _BackClip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.clamp(ctx.scale * grad, -1.0, 1.0), None


class BackwardClip(nn.Module):
    """Identity forward; backward replaces the gradient g by clip(scale * g, -1, 1) (Amit's
    ``bscale``). Placed in front of a layer, it clips that layer's input gradient. scale 0: off."""

    def __init__(self, scale: float = 0.0):
        super().__init__()
        if scale < 0:
            raise ValueError(f"BackwardClip: scale must be >= 0 (0: off), got {scale}")
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 0 or not torch.is_grad_enabled():
            return x
        return _BackClip.apply(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def glorot_bound(module: nn.Module) -> float:
    """The Glorot uniform bound sqrt(6 / (fan_in + fan_out)) of a layer's filter, fans counted as in
    Amit's ``comp_lim``: Linear: in + out; Conv: kh * kw * (in + out); LocallyConnected2d: that of
    the one convolution it unties (its per-position filter)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError(f"glorot_bound: {type(module).__name__} has no weight matrix or filter bank")
    shape = weight.shape[-4:] if weight.dim() == 6 else weight.shape  # untied: one position's filter bank
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    return math.sqrt(6.0 / (fan_in + fan_out))


@torch.no_grad()
def clip_weights(modules: Iterable[nn.Module], factor: float = WEIGHT_CLIP_FACTOR) -> None:
    """Clip each module's weight, and its feedback weight B when :func:`hebbloss.feedback.convert`
    gave it one, to +/- ``factor`` * :func:`glorot_bound` (Amit 2019: factor 1.5)."""
    for m in modules:
        bound = factor * glorot_bound(m)
        m.weight.clamp_(-bound, bound)
        feedback = getattr(m, FEEDBACK_WEIGHT, None)
        if isinstance(feedback, torch.Tensor):
            feedback.clamp_(-bound, bound)


def clip_weights_after_step(optimizer: torch.optim.Optimizer, modules: Iterable[nn.Module],
                            factor: float = WEIGHT_CLIP_FACTOR) -> RemovableHandle:
    """Register a step post-hook on ``optimizer`` that calls :func:`clip_weights` on ``modules``
    after every ``optimizer.step()`` (Amit 2019); returns the removable handle."""
    modules = list(modules)
    if not factor > 0:
        raise ValueError(f"clip_weights_after_step: factor must be > 0, got {factor}")
    for m in modules:
        glorot_bound(m)  # refuses a layer without a weight now, not at the first step

    def hook(opt, args, kwargs):
        clip_weights(modules, factor)

    return optimizer.register_step_post_hook(hook)
