"""Independent float64 reference of a local rule's update, written plainly (Miconi 2021).

For a layer whose output z is linear in its weight W (z = W x_patch + b) and a post signal y:

    dW_c = sum_{b,p} y[b, c, p] * x_patch[b, p]  -  S_c * W_c
    db_c = sum_{b,p} y[b, c, p]                  -  S_c * b_c,      S_c = sum_{b,p} s(y, z)[b, c, p]

with the decay density s of each rule: hebb 0, instar y, oja y^2, softhebb y*z (Hebb 1949;
Grossberg 1976; Oja 1982; Journe et al. 2023).

Nothing here calls hebbloss or autograd. Patches are built explicitly: the input is padded with
``torch.nn.functional.pad`` as ``padding_mode`` says, then one strided slice per kernel offset gives
the input each weight tap saw at every output position. For a transposed convolution the patches
come from its definition: input position q scatters ``x[i, q] * W[i, o, k]`` onto output position
``q*stride + k*dilation - padding``, so ``dW[i, o, k] = sum_q x[i, q] * y[o, q*stride + k*dilation - padding]``.

Stable signatures (other test files import them):
    reference_update(kind, weight, bias, x, y, S, stride=1, padding=0, dilation=1, groups=1,
                     padding_mode="zeros", output_padding=0, transposed=False) -> (dW, db or None)
    layer_update(layer, x, y, S) -> (dW, db or None)          # config read from an nn.Linear/Conv/ConvTranspose
    decay_coefficients(rule, y, z, channel_dim) -> S           # S_c for "hebb", "instar", "oja", "softhebb"
    rule_update(layer, x, y, z, rule) -> (dW, db or None)
    unit_norms_sq(layer) -> ||W_c||^2 + b_c^2 per output unit
    tf_same_pad(x, kernel_size, stride, dilation) -> x padded as TensorFlow "SAME" (timm Conv2dSame)
All results are float64.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

RULES = ("hebb", "instar", "oja", "softhebb")
D = torch.float64


def _tuple(value, n: int) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    return value * n if len(value) == 1 else value


def decay_density(rule: str, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """s(y, z) of a rule, element-wise: hebb 0, instar y, oja y^2, softhebb y*z."""
    y, z = y.to(D), z.to(D)
    if rule == "hebb":
        return torch.zeros_like(y)
    if rule == "instar":
        return y
    if rule == "oja":
        return y * y
    if rule == "softhebb":
        return y * z
    raise KeyError(rule)


def decay_coefficients(rule: str, y: torch.Tensor, z: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """S_c = sum over every sample and position of s(y, z), one value per output unit c."""
    s = decay_density(rule, y, z)
    channel_dim = channel_dim % s.dim()
    return s.movedim(channel_dim, 0).reshape(s.shape[channel_dim], -1).sum(dim=1)


def _bias_update(bias, y, S, channel_dim):
    if bias is None:
        return None
    y = y.to(D)
    channel_dim = channel_dim % y.dim()
    return y.movedim(channel_dim, 0).reshape(y.shape[channel_dim], -1).sum(dim=1) - S * bias.to(D)


def linear_update(weight, bias, x, y, S):
    """nn.Linear over any leading dims: dW = sum_n y_n x_n^T - S W, db = sum_n y_n - S b."""
    W, x, y, S = weight.to(D), x.to(D), y.to(D), S.to(D)
    xs = x.reshape(-1, W.shape[1])
    ys = y.reshape(-1, W.shape[0])
    dW = torch.einsum("no,ni->oi", ys, xs) - S[:, None] * W
    return dW, _bias_update(bias, y, S, -1)


def _pads(padding, kernel, dilation, n):
    """(left, right) padding per spatial dim; 'same' puts the odd extra at the end, like PyTorch."""
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in _tuple(padding, n)]


def _fpad_arg(pads):
    """F.pad wants the last dim's (left, right) first."""
    return [v for lr in reversed(pads) for v in lr]


def conv_update(weight, bias, x, y, S, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """nn.ConvNd: weight [out, in/groups, *k]; dW[o, i, k] = sum_{b,p} y[b,o,p] x_pad[b,i,p*stride + k*dilation]."""
    W, x, y, S = weight.to(D), x.to(D), y.to(D), S.to(D)
    n = W.dim() - 2
    kernel = tuple(W.shape[2:])
    stride, dilation = _tuple(stride, n), _tuple(dilation, n)
    pads = _pads(padding, kernel, dilation, n)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    xp = F.pad(x, _fpad_arg(pads), mode=mode) if any(l or r for l, r in pads) else x
    B, c_in = x.shape[:2]
    c_out = W.shape[0]
    G = groups
    out_size = tuple(y.shape[2:])
    yg = y.reshape(B, G, c_out // G, -1)
    xg = xp.reshape(B, G, c_in // G, *xp.shape[2:])
    hebb = torch.zeros(G, c_out // G, c_in // G, *kernel, dtype=D)
    for k in itertools.product(*(range(kk) for kk in kernel)):
        window = tuple(
            slice(k[d] * dilation[d], k[d] * dilation[d] + stride[d] * (out_size[d] - 1) + 1, stride[d]) for d in range(n)
        )
        patch = xg[(slice(None),) * 3 + window]  # [B, G, in/G, *out_size]: the input tap k saw at every position
        assert tuple(patch.shape[3:]) == out_size
        hebb[(slice(None),) * 3 + k] = torch.einsum("bgop,bgip->goi", yg, patch.reshape(B, G, c_in // G, -1))
    dW = hebb.reshape(W.shape) - S.reshape(-1, *([1] * (W.dim() - 1))) * W
    return dW, _bias_update(bias, y, S, 1)


def conv_transpose_update(weight, bias, x, y, S, stride=1, padding=0, dilation=1, groups=1, output_padding=0):
    """nn.ConvTransposeNd: weight [in, out/groups, *k]; dW[i, o, k] = sum_{b,q} x[b,i,q] y[b, o, q*stride + k*dilation - padding].

    Unit c = g*(out/groups) + o owns W[i, o, :] for every input channel i of group g, so its decay
    is S_c * W[i, o, :]. ``output_padding`` only lengthens the output, which ``y`` already has.
    """
    W, x, y, S = weight.to(D), x.to(D), y.to(D), S.to(D)
    n = W.dim() - 2
    kernel = tuple(W.shape[2:])
    stride, dilation, pad = _tuple(stride, n), _tuple(dilation, n), _tuple(padding, n)
    B, c_in = x.shape[:2]
    G = groups
    out_g = W.shape[1]
    in_size = tuple(x.shape[2:])
    # output index q*stride + k*dilation - padding, shifted by +padding into the zero-padded y
    yp = F.pad(y, _fpad_arg([(p, p) for p in pad])) if any(pad) else y
    yg = yp.reshape(B, G, out_g, *yp.shape[2:])
    xg = x.reshape(B, G, c_in // G, -1)
    hebb = torch.zeros(G, c_in // G, out_g, *kernel, dtype=D)
    for k in itertools.product(*(range(kk) for kk in kernel)):
        window = tuple(
            slice(k[d] * dilation[d], k[d] * dilation[d] + stride[d] * (in_size[d] - 1) + 1, stride[d]) for d in range(n)
        )
        target = yg[(slice(None),) * 3 + window]  # [B, G, out/G, *in_size]: where input q sent tap k
        assert tuple(target.shape[3:]) == in_size
        hebb[(slice(None),) * 3 + k] = torch.einsum("bgiq,bgoq->gio", xg, target.reshape(B, G, out_g, -1))
    S_go = S.reshape(G, 1, out_g, *([1] * n))
    dW = (hebb - S_go * W.reshape(G, c_in // G, out_g, *kernel)).reshape(W.shape)
    return dW, _bias_update(bias, y, S, 1)


def reference_update(
    kind: str,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    S: torch.Tensor,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int], str] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    output_padding: Union[int, Sequence[int]] = 0,
    transposed: bool = False,
):
    """(dW, db) of the rule with decay coefficients S for a "linear" or "conv*" layer, in float64.

    kind: "linear", or "conv"/"conv1d"/"conv2d"/"conv3d" (with transposed=False) or
        "conv_transpose*" (or "conv*" with transposed=True). x is the layer's input (before its
        own padding), y the post signal with the output's shape, S one coefficient per output unit.
    """
    if kind == "linear":
        return linear_update(weight, bias, x, y, S)
    if kind.startswith("conv_transpose") or transposed:
        return conv_transpose_update(weight, bias, x, y, S, stride, padding, dilation, groups, output_padding)
    if kind.startswith("conv"):
        return conv_update(weight, bias, x, y, S, stride, padding, dilation, groups, padding_mode)
    raise KeyError(kind)


def layer_update(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, S: torch.Tensor):
    """reference_update with the configuration read from an nn.Linear / ConvNd / ConvTransposeNd.

    ``layer.weight`` is used as W (for a pruned layer that is weight_orig * weight_mask).
    """
    if isinstance(layer, nn.Linear):
        return linear_update(layer.weight.detach(), _b(layer), x, y, S)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return conv_transpose_update(
            layer.weight.detach(), _b(layer), x, y, S, layer.stride, layer.padding, layer.dilation, layer.groups, layer.output_padding
        )
    if isinstance(layer, nn.modules.conv._ConvNd):
        return conv_update(
            layer.weight.detach(), _b(layer), x, y, S, layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode
        )
    raise TypeError(f"no reference for {type(layer).__name__}")


def _b(layer):
    return None if layer.bias is None else layer.bias.detach()


def channel_dim_of(layer: nn.Module) -> int:
    """Output dimension indexing the units: last for Linear, 1 for convolutions."""
    return -1 if isinstance(layer, nn.Linear) else 1


def rule_update(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, rule: str):
    """(dW, db) of ``rule`` for ``layer`` that saw input x, produced z and got post signal y."""
    S = decay_coefficients(rule, y, z, channel_dim_of(layer))
    return layer_update(layer, x, y, S)


def unit_norms_sq(layer: nn.Module) -> torch.Tensor:
    """||W_c||^2 (+ b_c^2 with a bias) of every output unit c, in float64, by an explicit loop over units.

    A transposed convolution's unit c = g*(out/groups) + o owns W[i, o] for the input channels i of group g.
    """
    W = layer.weight.detach().to(D)
    b = None if layer.bias is None else layer.bias.detach().to(D)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        G, out_g = layer.groups, W.shape[1]
        in_g = W.shape[0] // G
        units = [W[g * in_g:(g + 1) * in_g, o] for g in range(G) for o in range(out_g)]
    else:
        units = [W[c] for c in range(W.shape[0])]
    norms = torch.stack([(u * u).sum() for u in units])
    return norms if b is None else norms + b * b


def tf_same_pad(x: torch.Tensor, kernel_size, stride, dilation) -> torch.Tensor:
    """x zero-padded as TensorFlow "SAME": total max((ceil(L/s)-1)*s + (k-1)*d + 1 - L, 0), odd extra at the end."""
    n = x.dim() - 2
    kernel_size, stride, dilation = _tuple(kernel_size, n), _tuple(stride, n), _tuple(dilation, n)
    pads = []
    for L, k, s, d in zip(x.shape[2:], kernel_size, stride, dilation):
        total = max((math.ceil(L / s) - 1) * s + (k - 1) * d + 1 - L, 0)
        pads.append((total // 2, total - total // 2))
    return F.pad(x, _fpad_arg(pads))
