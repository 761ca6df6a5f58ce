"""Convolutions and transposed convolutions of 1, 2 and 3 dimensions, with every option.

A convolution stores its weight as [out, in/groups, *kernel]; a transposed one as
[in, out/groups, *kernel], so its units are gathered across groups (LayerType.transposed).

Its backward halves, for the feedback modes, as pure functions of the error delta = dL/dz:
the input gradient is the transposed operator applied to delta with any weight B in place of W
(B = W is backprop; B != W is feedback alignment, Lillicrap et al. 2016); the weight gradient is
delta * x^T (Amit 2019 gives B the same one). Both use ``torch.ops.aten.convolution_backward``
(the kernel autograd itself calls for convolutions), except where the CPU has a faster route to the
weight gradient: a matrix product with the input patches (:func:`takes_matmul`; a channels-last 1x1
convolution, whose patches are its input) or, for a depthwise convolution, a forward depthwise
convolution (:func:`takes_depthwise_correlation`). They are computed in delta's dtype (autocast)
and returned in the dtype of x and B.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import LayerType, register, sparse


@dataclass(frozen=True)
class ConvGeometry:
    """How an N-d convolution maps its input: optional explicit padding (F.pad order), then a conv.

    pads is None when the padding is symmetric zeros, passed to the convolution as ``padding``.
    A transposed convolution (weight [in, out/groups, ...]) has no explicit padding; its
    output_padding is the one of the call (it depends on ``output_size`` when that is given).
    """

    dims: int
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int
    pads: Optional[Tuple[int, ...]] = None
    mode: str = "constant"
    transposed: bool = False
    output_padding: Tuple[int, ...] = ()


def symmetric_or_explicit(pads: Sequence[int], mode: str, common: dict) -> ConvGeometry:
    """Padding ``pads`` (F.pad order) as the convolution's own when symmetric, else as explicit pads."""
    pads = [int(p) for p in pads]
    left, right = pads[0::2], pads[1::2]  # last dimension first, as F.pad wants
    if left == right:
        return ConvGeometry(padding=tuple(reversed(left)), **common)
    return ConvGeometry(padding=(0,) * common["dims"], pads=tuple(pads), mode=mode, **common)


def _output_padding(module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> Tuple[int, ...]:
    """The output_padding that gave ``output`` from ``x``: out = (in-1)s - 2p + d(k-1) + 1 + output_padding."""
    if output is None:
        raise ValueError(f"{type(module).__name__} is a transposed convolution: pass its output to geometry()")
    dims = len(module.kernel_size)
    return tuple(
        int(o - ((i - 1) * s - 2 * p + d * (k - 1) + 1))
        for i, o, s, p, d, k in zip(x.shape[-dims:], output.shape[-dims:], module.stride, module.padding,
                                    module.dilation, module.kernel_size)
    )


def _batched(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t if t.dim() == dims + 2 else t.unsqueeze(0)


def _padded_shape(shape: torch.Size, pads: Sequence[int]) -> List[int]:
    out = list(shape)
    for i in range(len(pads) // 2):
        out[-1 - i] += pads[2 * i] + pads[2 * i + 1]
    return out


def _conv_backward(delta, x, weight, geom: ConvGeometry, mask):
    return torch.ops.aten.convolution_backward(
        delta, x, weight, None, geom.stride, geom.padding, geom.dilation, geom.transposed,
        list(geom.output_padding) or [0] * geom.dims, geom.groups, mask,
    )


def conv_input_grad(delta: torch.Tensor, x: torch.Tensor, feedback: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """The adjoint of the convolution applied to delta with B in place of W (then the adjoint of the
    input padding): a transposed convolution for a convolution, a convolution for a transposed one."""
    unbatched = x.dim() == geom.dims + 1
    xb, db = _batched(x, geom.dims), _batched(delta, geom.dims)
    fb = feedback.to(delta.dtype)
    if geom.pads is None:
        shape_src = xb.to(delta.dtype) if xb.dtype != delta.dtype else xb
    else:  # only the shape of the padded input is read for the input gradient
        shape_src = db.new_empty(()).expand(_padded_shape(xb.shape, geom.pads))
    grad = _conv_backward(db, shape_src, fb, geom, [True, False, False])[0]
    if geom.pads is not None:
        grad = _unpad(grad, xb, geom)
    grad = grad.to(x.dtype)
    return grad.squeeze(0) if unbatched else grad


def _unpad(grad: torch.Tensor, xb: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """Adjoint of F.pad: a crop for zero padding, autograd's own for reflect/replicate/circular."""
    if geom.mode == "constant" and min(geom.pads) >= 0:
        index = [slice(None)] * grad.dim()
        for i in range(len(geom.pads) // 2):
            index[grad.dim() - 1 - i] = slice(geom.pads[2 * i], geom.pads[2 * i] + xb.shape[-1 - i])
        return grad[tuple(index)]
    _, pullback = torch.func.vjp(lambda t: F.pad(t, list(geom.pads), mode=geom.mode), xb.to(grad.dtype))
    return pullback(grad)[0]


def conv_weight_grad(delta: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """delta * x^T for a convolution: the gradient of its weight (of ``weight``'s shape). By the
    framework's kernel, or on the CPU by a faster route: matrix products with the input patches (where
    :func:`takes_matmul`, and for a channels-last 1x1 convolution), or a forward depthwise convolution
    (where :func:`takes_depthwise_correlation`)."""
    xb, db = _batched(x, geom.dims).to(delta.dtype), _batched(delta, geom.dims)
    if takes_matmul(delta, weight, geom) or _pointwise_channels_last(db, xb, weight, geom):
        return _matmul_weight_grad(db, _zero_or_explicit_pad(xb, geom), weight.shape[2:], geom).to(weight.dtype)
    if takes_depthwise_correlation(delta, weight, geom):
        return _depthwise_weight_grad(db, xb, weight.shape[2:], geom).to(weight.dtype)
    if geom.pads is not None:
        xb = F.pad(xb, list(geom.pads), mode=geom.mode)
    grad = _conv_backward(db, xb, weight.to(delta.dtype), geom, [False, True, False])[1]
    return grad.to(weight.dtype)


MATMUL_WEIGHT_BYTES = 4 * 2 ** 20  # see takes_matmul
MATMUL_UNITS_PER_POSITION = 16  # see takes_matmul


def takes_matmul(delta: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> bool:
    """Whether :func:`conv_weight_grad` takes delta * x^T as matrix products, [C_out, positions] times
    the im2col matrix of the input patches [positions, fan_in] (positions: samples x output positions),
    rather than by the framework's kernel: on the CPU, in float32 or float64, for a convolution with
    groups=1, not transposed, whose weight is at least MATMUL_WEIGHT_BYTES, and whose positions are no
    more than its units, or whose units are at least MATMUL_UNITS_PER_POSITION times the positions of
    one sample (the product is then taken over batch chunks of at most as many positions as units, so
    that no patch copy is larger than the weight). oneDNN's weight-gradient kernel is slow there, a large
    weight summed over few positions (Xeon, AVX512, 1 thread: the SoftHebb network's layer 3, 1,536 units
    x 384 x 3 x 3 over 8 x 8 positions a sample, 47 ms against 61 ms at batch 10 and 325 against 381 ms
    at batch 64; 768 -> 3,072 units over 4 x 4 positions, 82 against 190 ms at batch 10), and faster than
    the matrix product where a sample's positions are many for the units (resnet18's 3x3 convolutions at
    batch 32: 1.07x to 3x the product's speed, 512 units over 7 x 7 positions the closest)."""
    if not _patch_product_applies(delta, geom) or weight.numel() * delta.element_size() < MATMUL_WEIGHT_BYTES:
        return False
    batched = delta.dim() == geom.dims + 2
    units = delta.shape[1] if batched else delta.shape[0]
    positions = delta.numel() // units
    per_sample = positions // delta.shape[0] if batched and delta.shape[0] else positions
    return 0 < positions and (positions <= units or MATMUL_UNITS_PER_POSITION * per_sample <= units)


def _patch_product_applies(delta: torch.Tensor, geom: ConvGeometry) -> bool:
    """What both patch-product routes (:func:`takes_matmul`, :func:`_pointwise_channels_last`) ask first:
    delta on the CPU in float32 or float64, for a convolution with groups=1, not transposed."""
    return delta.device.type == "cpu" and delta.dtype in (torch.float32, torch.float64) \
        and not geom.transposed and geom.groups == 1


def _pointwise_channels_last(db: torch.Tensor, xb: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> bool:
    """Whether a 1x1 convolution (stride 1, no padding, groups=1) sees channels-last delta and input on
    the CPU in float32 or float64: its im2col matrix is then the input itself, a view, and delta * x^T
    one matrix product of two views ([C_out, positions] @ [positions, C_in]), with no copy. oneDNN's
    kernel took 3-20 % longer on timm convnext_atto's 1x1 layers (Xeon, AVX512, 1 thread), where its
    weight-gradient call on a batch of fewer than 16 samples goes to PyTorch's slow 2-d kernel."""
    if not _patch_product_applies(db, geom) or geom.pads is not None or any(geom.padding) \
            or any(s != 1 for s in geom.stride) or any(k != 1 for k in weight.shape[2:]) or db.dim() != 4:
        return False
    return db.is_contiguous(memory_format=torch.channels_last) and xb.is_contiguous(memory_format=torch.channels_last)


def takes_depthwise_correlation(delta: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> bool:
    """Whether :func:`conv_weight_grad` takes a depthwise convolution's delta * x^T (one unit per input
    channel: groups = in = out channels) as a forward depthwise convolution of the padded input by delta
    (:func:`_depthwise_weight_grad`), rather than by the framework's weight-gradient kernel: on the CPU,
    in float32, where oneDNN's forward depthwise kernel is several times faster than its weight-gradient
    one (Xeon, AVX512, 1 thread, channels-last [32, C, H, H] in batch chunks of 1 MiB, 7x7: C=40, H=56
    17 ms against 49; 80 x 28: 7 against 24; 160 x 14: 4 against 14; 320 x 7: 2 against 11 (timm
    convnext_atto's four stages))."""
    return delta.device.type == "cpu" and delta.dtype == torch.float32 and not geom.transposed \
        and geom.groups > 1 and weight.shape[0] == geom.groups and weight.shape[1] == 1


def _depthwise_weight_grad(db: torch.Tensor, xb: torch.Tensor, kernel: Sequence[int],
                           geom: ConvGeometry) -> torch.Tensor:
    """delta * x^T of a depthwise convolution (see :func:`takes_depthwise_correlation`): with z[n, c, p] =
    sum_k W[c, k] x_padded[n, c, s p + d k], the gradient sum_{n, p} delta[n, c, p] x_padded[n, c, s p + d k]
    is, for each (sample, channel) pair as a group of its own, the convolution of the padded input by
    delta dilated by the stride s at stride d (the dilation), cropped to the kernel and summed over the
    samples. Symmetric zero padding is the convolution's own (no padded copy of the input). Each lag is
    summed over a sample's whole map in float32: 1e-6 of the float64 sum for 56 x 56 maps, where the
    weight-gradient kernel's rounding was 3e-7 (both well inside float32's use here)."""
    batch, channels, out_size = db.shape[0], db.shape[1], db.shape[2:]
    dims = len(kernel)
    groups = batch * channels
    padding = geom.padding if geom.pads is None else [0] * dims
    x_padded = xb if geom.pads is None else _zero_or_explicit_pad(xb, geom)
    lags = torch.convolution(
        x_padded.reshape(1, groups, *x_padded.shape[2:]), db.reshape(groups, 1, *out_size), None,
        geom.dilation, padding, geom.stride, False, [0] * dims, groups)
    lags = lags[(0, slice(None)) + tuple(slice(0, k) for k in kernel)]  # lags past the kernel: trailing rows
    return lags.reshape(batch, channels, *kernel).sum(dim=0).unsqueeze(1)


def _zero_or_explicit_pad(xb: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """The input with the convolution's padding applied (its own symmetric zeros, or the explicit pads)."""
    if geom.pads is not None:
        return F.pad(xb, list(geom.pads), mode=geom.mode)
    if any(geom.padding):
        return F.pad(xb, [p for size in reversed(geom.padding) for p in (size, size)])
    return xb


def _matmul_weight_grad(db: torch.Tensor, x_padded: torch.Tensor, kernel: Sequence[int],
                        geom: ConvGeometry) -> torch.Tensor:
    """delta * x^T as [C_out, positions] @ [positions, fan_in], summed over batch chunks of at most
    as many positions as units (one sample at least; see :func:`takes_matmul`). The patches
    (:func:`sparse.patch_rows`) are put in the weight's order where the whole batch is one chunk (they
    are then no larger than the product), else the product is, once."""
    units, out_size = db.shape[1], db.shape[2:]
    pointwise = all(k == 1 for k in kernel) and all(s == 1 for s in geom.stride)  # its patches are the input's pixels
    step = db.shape[0] if pointwise else max(1, units // max(1, math.prod(out_size)))
    in_weight_order = step >= db.shape[0]
    product = None
    for d_c, x_c in zip(db.split(step), x_padded.split(step)):
        patches = sparse.patch_rows(sparse.patch_windows(x_c, out_size, kernel, geom.stride, geom.dilation),
                                    in_weight_order)
        signal = d_c.movedim(1, -1).reshape(-1, units)
        product = signal.t() @ patches if product is None else product.addmm_(signal.t(), patches)
    return sparse.in_weight_layout(product, kernel, x_padded.shape[1], in_weight_order)


def has_sparse_product(geom: ConvGeometry) -> bool:
    """Whether :func:`conv_sparse_weight_grad` serves this geometry: groups=1, not transposed."""
    return not geom.transposed and geom.groups == 1


def conv_sparse_weight_grad(delta: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            geom: ConvGeometry) -> torch.Tensor:
    """:func:`conv_weight_grad` for a sparse delta, from its nonzeros (:mod:`hebbloss.layers.sparse`);
    not for a transposed or grouped convolution (:func:`has_sparse_product`)."""
    if not has_sparse_product(geom):
        raise ValueError("the sparse weight-gradient product is for convolutions with groups=1, not transposed")
    xb, db = _zero_or_explicit_pad(_batched(x, geom.dims), geom), _batched(delta, geom.dims)
    grad = sparse.conv_sparse_weight_grad(db, xb, weight.shape[2:], geom.stride, geom.dilation)
    return grad.to(weight.dtype)


class ConvAdjoint:
    """:func:`conv_input_grad`, :func:`conv_weight_grad` and :func:`conv_sparse_weight_grad` for one
    call's geometry."""

    def __init__(self, geom: ConvGeometry):
        self.geom = geom
        if not has_sparse_product(geom):  # the dense product serves
            self.sparse_weight_grad = None

    def input_grad(self, delta, x, feedback):
        return conv_input_grad(delta, x, feedback, self.geom)

    def weight_grad(self, delta, x, feedback):
        return conv_weight_grad(delta, x, feedback, self.geom)

    def sparse_weight_grad(self, delta, x, feedback):
        return conv_sparse_weight_grad(delta, x, feedback, self.geom)

    def weight_grad_is_faster(self, delta, feedback):
        return takes_matmul(delta, feedback, self.geom)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class Convolution(LayerType):
    """Units are dimension 1 of a batched output (0 unbatched); any stride, padding, padding_mode,
    dilation and groups. The registered family picks the dimension and transposition of each layer."""

    name = "conv"

    def of(self, module):
        kernel = getattr(module, "kernel_size", None)  # a layer registered with CONV[n] may not have one
        if kernel is None:
            return self
        return _kind(type(self), len(kernel), bool(getattr(module, "transposed", False)))

    def adjoint(self, module, x, output):
        return ConvAdjoint(self.geometry(module, x, output))

    def geometry(self, module: nn.Module, x: torch.Tensor, output: Optional[torch.Tensor] = None) -> ConvGeometry:
        """The geometry ``module`` uses on input ``x``; a transposed convolution also needs the
        ``output`` of that call."""
        dims = len(module.kernel_size)
        common = dict(dims=dims, stride=tuple(module.stride), dilation=tuple(module.dilation), groups=module.groups)
        if module.transposed:
            return ConvGeometry(padding=tuple(module.padding), transposed=True,
                                output_padding=_output_padding(module, x, output), **common)
        if module.padding_mode != "zeros":
            return ConvGeometry(padding=(0,) * dims, pads=tuple(module._reversed_padding_repeated_twice),
                                mode=module.padding_mode, **common)
        if isinstance(module.padding, str):  # "same" (possibly one more on the right) or "valid"
            return symmetric_or_explicit(list(module._reversed_padding_repeated_twice), "constant", common)
        return ConvGeometry(padding=tuple(module.padding), **common)


@functools.lru_cache(maxsize=None)
def _kind(family: type, dims: int, transposed: bool) -> Convolution:
    return family(f"conv_transpose{dims}d" if transposed else f"conv{dims}d", spatial_dims=dims, transposed=transposed)


CONV = {n: _kind(Convolution, n, False) for n in (1, 2, 3)}
CONV_TRANSPOSE = {n: _kind(Convolution, n, True) for n in (1, 2, 3)}
