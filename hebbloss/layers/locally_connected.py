"""hebbloss.feedback.LocallyConnected2d: an untied convolution, a separate filter at every output
position (Amit 2019), weight [out_h, out_w, out_channels, in_channels/groups, kh, kw].

Its output [N, out_channels, out_h, out_w] is linear in the weight. This file holds its math, forward
and both backward halves, as one ``torch.bmm`` over positions (and groups): the input's patches are
gathered once as [N, positions, patch], so each position's matrix is a strided view with unit stride
along the patch, which BLAS multiplies in place. (An einsum over unfold's [N, patch, positions] hands
bmm matrices without a unit stride, which CPU bmm copies one matrix at a time.)

Only :func:`hebbloss.feedback.convert` trains it: the surrogate term's units (one weight row per output
channel) do not fit untied weights, so :func:`hebbloss.attach` skips it (and refuses it when named).
Registered by qualified name, as the layer lives in :mod:`hebbloss.feedback`, which builds on this
package.
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from . import LayerType, register


def _patches(x, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """The input patch at every output position, [N, L, in_channels * kh * kw] (channel-major within a patch,
    as ``F.unfold``), gathered in one copy from strided windows of ``x``."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    n, c, oh, ow = windows.shape[:4]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(n, oh * ow, c * kh * kw)


def _by_position(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, L, C] (patches, or an error per position) as [L * groups, N, C / groups]: a strided view that
    ``torch.bmm`` multiplies position by position (and group by group) without copying."""
    n, positions, c = t.shape
    return t.reshape(n, positions * groups, c // groups).transpose(0, 1)


def _filters(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[out_h, out_w, out_channels, in/groups, kh, kw] -> [L * groups, out/groups, in/groups * kh * kw]."""
    oh, ow, out_ch = weight.shape[:3]
    return weight.reshape(oh * ow * groups, out_ch // groups, -1)


def _errors(delta: torch.Tensor) -> torch.Tensor:
    """[N, C, out_h, out_w] -> [N, L, C], contiguous."""
    return delta.reshape(delta.shape[0], delta.shape[1], -1).transpose(1, 2).contiguous()


def _per_position_product(a: torch.Tensor, b: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """[N, L, width] whose row (n, l), group by group, is a[l*g] (n-th row) times b[l*g]: a is [L*g, N, k]
    (a view by position), b [L*g, k, width / g]."""
    n = a.shape[1]
    out = torch.empty(n, a.shape[0] // groups, width, dtype=a.dtype, device=a.device)
    torch.bmm(a, b, out=out.view(n, a.shape[0], width // groups).transpose(0, 1))
    return out


def local_input_grad(delta, weight, input_size: Sequence[int], stride, padding, dilation, groups) -> torch.Tensor:
    """dL/dx of the untied convolution for dL/dz = delta, with ``weight`` (W, or a feedback B): the fold
    (adjoint of unfold) of delta times each position's filter."""
    filters = _filters(weight, groups)
    cols = _per_position_product(_by_position(_errors(delta), groups), filters, groups, groups * filters.shape[-1])
    return F.fold(cols.transpose(1, 2), tuple(input_size), weight.shape[-2:],
                  dilation=dilation, padding=padding, stride=stride)


def _weight_grad(delta, patches, weight_shape, groups) -> torch.Tensor:
    """delta * patch^T at every position, in the weight's layout (patches as from :func:`_patches`)."""
    errors = _by_position(_errors(delta), groups)  # [L*g, N, out/g]
    return torch.bmm(errors.transpose(1, 2), _by_position(patches, groups)).reshape(weight_shape)


class _LocalConv2d(torch.autograd.Function):
    """out[n, o, i, j] = sum_k weight[i, j, o, k] * patch_{i,j}(x)[n, k], its backward written out."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        oh, ow, out_ch = weight.shape[:3]
        w = weight.to(x.dtype)
        patches = _patches(x, weight.shape[-2:], stride, padding, dilation)  # [N, L, in * kh * kw]
        out = _per_position_product(_by_position(patches, groups), _filters(w, groups).transpose(1, 2), groups, out_ch)
        ctx.save_for_backward(patches, w)
        ctx.conf, ctx.input_size, ctx.weight_dtype = (stride, padding, dilation, groups), x.shape[-2:], weight.dtype
        return out.transpose(1, 2).reshape(x.shape[0], out_ch, oh, ow)

    @staticmethod
    @once_differentiable
    def backward(ctx, delta):
        patches, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        delta = delta.to(w.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = local_input_grad(delta, w, ctx.input_size, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(delta, patches, w.shape, groups).to(ctx.weight_dtype)
        return grad_x, grad_w, None, None, None, None


def local_conv2d(x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """Untied convolution (Amit 2019): out[n, o, i, j] = sum_k weight[i, j, o, k] * patch_{i,j}(x)[n, k] + bias[o, i, j].

    weight: [out_h, out_w, out_channels, in_channels/groups, kh, kw]; x: [N, C, H, W]. Differentiable
    once (its backward is written out, as batched products over positions).
    """
    conf: Tuple = (_pair(stride), _pair(padding), _pair(dilation), int(groups))
    out = _LocalConv2d.apply(x, weight, *conf)
    return out if bias is None else out + bias.to(out.dtype)


class LocalAdjoint:
    """Backward halves of :func:`local_conv2d` for one LocallyConnected2d."""

    def __init__(self, module):
        self.m = module

    def input_grad(self, delta, x, feedback):
        """dL/dx with B in place of the weight."""
        m = self.m
        grad = local_input_grad(delta, feedback.to(delta.dtype), x.shape[-2:], m.stride, m.padding, m.dilation, m.groups)
        return grad.to(x.dtype)

    def weight_grad(self, delta, x, feedback):
        """delta * patch^T at every position, in the weight's layout."""
        m = self.m
        patches = _patches(x.to(delta.dtype), m.kernel_size, m.stride, m.padding, m.dilation)
        return _weight_grad(delta, patches, feedback.shape, m.groups).to(feedback.dtype)


@register("hebbloss.feedback.locally_connected.LocallyConnected2d")
class LocallyConnected(LayerType):
    """Channels are dimension 1 of the output [N, C, out_h, out_w]."""

    name, spatial_dims = "locally_connected2d", 2
    cannot_be_plastic = ("its weight holds a separate filter at each output position, which the surrogate "
                         "term's units do not cover; train it with hebbloss.feedback.convert() instead")

    def adjoint(self, module, x, output):
        return LocalAdjoint(module)
