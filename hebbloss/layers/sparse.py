"""The Hebbian product sum y x of a sparse post signal y, gathered at y's nonzeros (k-WTA, Miconi 2021).

A k-winners-take-all post signal has k nonzeros among a position's C units (Miconi's binarised
plastic signal: one among 100 to 400). The dense weight-gradient kernel multiplies all C of them,
C x fan_in products per position; here each unit's row of the product is the sum of the input patches
(rows of x for a Linear layer) at which that unit is nonzero, times its value, one ``index_add_``:
about k x fan_in additions per position, plus one copy of the patches. The patches of a convolution
are strided windows of its (padded) input in channels-last order, copied in batch chunks of at most
``chunk_bytes`` (default :data:`PATCH_CHUNK_BYTES`).

Same sum as the dense kernel up to float rounding (the order of the additions differs); accumulated
in float32 at least. :func:`hebbloss._local.chunked_hebbian` chooses it on the CPU where y is sparse.
The patches (:func:`patch_windows`, :func:`patch_rows`, :func:`in_weight_layout`) also serve the dense
matrix product of :mod:`hebbloss.layers.conv`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

PATCH_CHUNK_BYTES = 4 * 2 ** 20  # patches copied per index_add_ call, read back while in the cache (Xeon, 1 thread:
# 1 to 16 MiB within 10 % of each other on Miconi's layers 2 and 3; one copy of the whole batch up to 2x slower)


def _accumulate(out: torch.Tensor, rows: torch.Tensor, post: torch.Tensor) -> None:
    """out[c] += sum over n of post[n, c] * rows[n], over the nonzeros of ``post`` ([N, C]) only."""
    n, c = post.nonzero(as_tuple=True)
    if n.numel() == 0:
        return
    values = post[n, c]
    if n.numel() != rows.shape[0] or not torch.equal(n, torch.arange(rows.shape[0], device=n.device)):
        rows = rows.index_select(0, n)  # not exactly one nonzero per row: gather the rows of the nonzeros
    if not bool((values == 1).all()):  # a binary signal (Miconi's) needs no scaling
        rows = rows * values.to(rows.dtype).unsqueeze(1)
    out.index_add_(0, c, rows.to(out.dtype))


def linear_sparse_weight_grad(post: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over samples (and leading dimensions) of y x^T for z = x W^T + b, shape [out, in], from y's
    nonzeros; in float32, or in y's dtype where that is wider (float64)."""
    wide = torch.promote_types(post.dtype, torch.float32)
    y, rows = post.reshape(-1, post.shape[-1]), x.reshape(-1, x.shape[-1])
    out = torch.zeros(y.shape[1], rows.shape[1], dtype=wide, device=post.device)
    _accumulate(out, rows, y)
    return out


def conv_sparse_weight_grad(post: torch.Tensor, x_padded: torch.Tensor, kernel: Sequence[int],
                            stride: Sequence[int], dilation: Sequence[int],
                            chunk_bytes: int = PATCH_CHUNK_BYTES) -> torch.Tensor:
    """sum over samples and positions of y x_patch for an N-d convolution with groups=1 on an input
    already padded (batched: [B, C_in, *spatial]; ``post`` [B, C_out, *out]), shape
    [C_out, C_in, *kernel], from y's nonzeros; in float32, or in y's dtype where that is wider."""
    wide = torch.promote_types(post.dtype, torch.float32)
    batch, units, out_size = post.shape[0], post.shape[1], post.shape[2:]
    windows = patch_windows(x_padded, out_size, kernel, stride, dilation)
    in_channels = x_padded.shape[1]
    positions, fan_in = math.prod(out_size), math.prod(kernel) * in_channels
    out = torch.zeros(units, fan_in, dtype=wide, device=post.device)
    y = post.reshape(batch, units, positions).transpose(1, 2)  # [B, P, C]: nonzeros come in patch order
    step = max(1, chunk_bytes // max(1, positions * fan_in * x_padded.element_size()))
    in_weight_order = batch * positions < units  # see patch_rows
    for start in range(0, batch, step):
        rows = patch_rows(windows[start:start + step], in_weight_order)  # the chunk's patches, one copy
        _accumulate(out, rows, y[start:start + step].reshape(-1, units))
    return in_weight_layout(out, kernel, in_channels, in_weight_order)


def patch_windows(x_padded: torch.Tensor, out_size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                  dilation: Sequence[int]) -> torch.Tensor:
    """The input patches of an N-d convolution (groups=1) on an input already padded ([B, C_in, *spatial]),
    as a strided view [B, *out_size, *kernel, C_in] of its channels-last copy: a patch is a run of whole
    pixels, and ``reshape(-1, prod(kernel) * C_in)`` copies them as the rows of an im2col matrix."""
    dims = len(kernel)
    x_last = x_padded.movedim(1, -1)
    if not x_last.is_contiguous():
        x_last = x_last.contiguous()
    s = x_last.stride()
    spatial = s[1:1 + dims]
    return x_last.as_strided(
        (x_padded.shape[0], *out_size, *kernel, x_last.shape[-1]),
        (s[0], *(a * b for a, b in zip(spatial, stride)), *(a * b for a, b in zip(spatial, dilation)), 1))


def patch_rows(windows: torch.Tensor, in_weight_order: bool = False) -> torch.Tensor:
    """The im2col matrix of :func:`patch_windows` ([B, *out_size, *kernel, C_in]), one copy: a row per
    output position, its columns in pixel order [*kernel, C_in], or with ``in_weight_order`` in the
    order of a convolution weight's [C_in, *kernel] (a second copy). A product of a signal with the
    rows comes out [C_out, fan_in]; :func:`in_weight_layout` makes it the weight's [C_out, C_in, *kernel]
    by reordering it, unless the rows were: the callers reorder whichever is smaller (rows where there are
    fewer of them than units)."""
    dims = (windows.dim() - 2) // 2
    taps, in_channels = math.prod(windows.shape[1 + dims:-1]), windows.shape[-1]
    rows = windows.reshape(-1, taps * in_channels)
    if not in_weight_order or taps == 1:
        return rows
    return rows.view(-1, taps, in_channels).transpose(1, 2).reshape(-1, in_channels * taps)


def in_weight_layout(product: torch.Tensor, kernel: Sequence[int], in_channels: int,
                     rows_in_weight_order: bool) -> torch.Tensor:
    """A product [C_out, fan_in] of a signal with :func:`patch_rows`, as [C_out, C_in, *kernel]."""
    if rows_in_weight_order or math.prod(kernel) == 1:
        return product.view(product.shape[0], in_channels, *kernel)
    return product.view(product.shape[0], *kernel, in_channels).movedim(-1, 1).contiguous()
