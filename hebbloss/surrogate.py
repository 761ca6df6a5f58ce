"""The surrogate loss whose negative gradient is a local rule's update (Miconi 2021).

For a layer with output z = W x_patch + b and a detached post-synaptic signal y:

    L(W) = - sum_{b,c,p} y * z(W)  +  1/2 * sum_c S_c * (||W_c||^2 + b_c^2),   S_c = sum_{b,p} s(y, z)
    =>  -dL/dW_c = sum_{b,p} y * x_patch - S_c * W_c

so one optimizer step on L is one step of the rule, computed by the framework's own kernels.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from . import layers, rules

_REDUCTIONS = ("sum", "mean")


def _weight_and_type(layer: Union[nn.Module, torch.Tensor]):
    """(effective weight, bias, LayerType, groups) for a module or a bare [out, ...] weight."""
    if isinstance(layer, torch.Tensor):
        kind = layers.linear.LINEAR if layer.dim() == 2 else layers.conv.CONV.get(layer.dim() - 2)
        if kind is None:
            raise ValueError(f"a bare weight must have 2 (linear) to 5 (conv3d) dimensions, got shape {tuple(layer.shape)}")
        return layer, None, kind, 1
    kind = layers.layer_type_of(layer)
    return layer.weight, layer.bias, kind, layers.groups_of(layer)


def decay_coefficients(rule: rules.Rule, kind: layers.LayerType, output: torch.Tensor, post: torch.Tensor,
                       dtype: torch.dtype) -> Optional[torch.Tensor]:
    """S_c = sum over samples and positions of the rule's density s(y, z) (``output`` and ``post``
    detached), or None when S = 0."""
    coefficients = rule.coefficients(post, output, kind.channel_dim(output))
    if coefficients is None or coefficients.dtype == dtype:
        return coefficients
    return coefficients.to(dtype)


def mean_scale(kind: layers.LayerType, output: torch.Tensor, reduction: str) -> float:
    """1 for reduction="sum"; 1/N, N the number of (sample, position) pairs, for "mean"."""
    if reduction == "sum":
        return 1.0
    return 1.0 / max(1, output.numel() // output.shape[kind.channel_dim(output)])


def flat_pair(a: torch.Tensor, b: torch.Tensor):
    """``a`` and ``b`` (same shape) as 1-D tensors whose i-th elements are at the same index of both: views
    in memory order where both are dense with equal strides (a channels-last output and its post signal,
    which ``reshape(-1)`` would copy whole), else ``reshape(-1)``."""
    if a.stride() == b.stride() and not a.is_contiguous():
        order = sorted(range(a.dim()), key=lambda d: -a.stride(d))
        pa = a.permute(order)
        if pa.is_contiguous():  # dense, no overlap: then so is b's, with the same strides
            return pa.view(-1), b.permute(order).view(-1)
    return a.reshape(-1), b.reshape(-1)


HALF = (torch.float16, torch.bfloat16)  # summed in float32 here


def surrogate_sums(output, post, weight, bias, decay, kind: layers.LayerType, groups: int):
    """(<y, z>, sum_c S_c (||W_c||^2 + b_c^2) or None when S = 0): L = scale * (-first + second / 2).
    Call it where no graph is recorded (under ``torch.no_grad()`` or in an autograd Function's forward).
    Half-precision y and z (autocast) are summed in float32: a float16 <y, z> over a large layer passes
    float16's largest value (65,504) long before any element does, and the loss would read Inf."""
    return _dot(*flat_pair(post, output)), decay_norm(weight, bias, decay, kind, groups)


DOT_CHUNK = 2 ** 18  # elements of a half-precision pair taken to float32 at a time in _dot


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> of two 1-D tensors; half precision in float32, a chunk of :data:`DOT_CHUNK` elements at a
    time, so that no activation-sized float32 copy is made (timm convnext_atto, batch 32, bf16 autocast:
    the copies of whole activations took 230 ms a step, 1 thread)."""
    if a.dtype not in HALF and b.dtype not in HALF:
        return torch.dot(a, b)
    total = torch.zeros((), dtype=torch.float32, device=a.device)
    for a_c, b_c in zip(a.split(DOT_CHUNK), b.split(DOT_CHUNK)):
        total += torch.dot(a_c.float(), b_c.float())
    return total


def decay_norm(weight, bias, decay, kind: layers.LayerType, groups: int) -> Optional[torch.Tensor]:
    """sum_c S_c (||W_c||^2 + b_c^2), or None when S = 0 (``decay`` None)."""
    if decay is None:
        return None
    norm_sq = torch.linalg.vector_norm(kind.unit_weights(weight, groups), dim=1).square_()
    if bias is not None:
        norm_sq.addcmul_(bias, bias)
    return torch.dot(decay, norm_sq)


class _Surrogate(torch.autograd.Function):
    """scale * (-<y, z> + 1/2 * sum_c S_c (||W_c||^2 + b_c^2)) as one autograd node.

    Its backward is written out: -scale*y for the output (which autograd passes on through the
    layer's own backward, giving sum y x_patch, and on to whatever else the output's graph reaches)
    and scale*S_c*W_c, scale*S_c*b_c for the decay. This equals autograd of the plain expression (the
    property tests check it in float64) and saves the graph nodes and temporaries of that expression.
    :func:`hebbloss.attach`, whose layers see a detached input, uses the private module ``hebbloss._local`` instead.
    """

    @staticmethod
    def forward(ctx, output, post, weight, bias, decay, kind, groups, scale):
        ctx.save_for_backward(post, weight, bias, decay)
        ctx.kind, ctx.groups, ctx.scale = kind, groups, scale
        correlation, decay_norm = surrogate_sums(output, post, weight, bias, decay, kind, groups)
        value = correlation.neg_() if decay_norm is None else decay_norm.mul_(0.5).sub_(correlation)
        return value.mul_(scale) if scale != 1.0 else value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        post, weight, bias, decay = ctx.saved_tensors
        if ctx.scale != 1.0:
            grad = grad * ctx.scale
        grad_output = post * grad.neg() if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        if decay is not None:
            coefficient = decay * grad
            if ctx.needs_input_grad[2]:
                grad_weight = weight * ctx.kind.per_unit(coefficient, weight, ctx.groups)
            if bias is not None and ctx.needs_input_grad[3]:
                grad_bias = bias * coefficient
        return grad_output, None, grad_weight, grad_bias, None, None, None, None


def surrogate_loss(
    layer: Union[nn.Module, torch.Tensor],
    output: torch.Tensor,
    post: torch.Tensor,
    rule: Union[str, rules.Rule] = "hebb",
    reduction: str = "sum",
) -> torch.Tensor:
    """Scalar L whose negative gradient w.r.t. the layer's weight and bias is the rule's update.

    layer: the module that produced ``output`` (its weight layout is read from it), or a bare
        weight tensor read as [out, in, *kernel] (Linear or convolution; then no bias term). Pass the
        module itself for a transposed convolution, whose weight is stored as [in, out/groups, ...].
    output: z, the layer's output, still attached to the graph of its weight.
    post: y, the post-synaptic signal, same shape as ``output`` (detached here).
    rule: a name from :func:`hebbloss.rules.available` or a :class:`hebbloss.rules.Rule`.
    reduction: "sum" gives exactly the rule's update; "mean" divides L by the number of
        (sample, position) pairs N, so SGD with learning rate lr*N reproduces "sum" with lr.
    """
    rule = rules.get(rule)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if post.shape != output.shape:
        raise ValueError(f"post has shape {tuple(post.shape)} but the layer's output has shape {tuple(output.shape)}")
    weight, bias, kind, groups = _weight_and_type(layer)
    post = post.detach()
    decay = decay_coefficients(rule, kind, output.detach(), post, weight.dtype)
    if decay is None:
        weight = bias = None  # plain Hebb: the decay term is 0 and needs no weight
    scale = mean_scale(kind, output, reduction)
    return _Surrogate.apply(output, post, weight, bias, decay, kind, groups, scale)
