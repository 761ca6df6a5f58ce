"""Convolutions and transposed convolutions of 1, 2 and 3 dimensions, with every option.

A convolution stores its weight as [out, in/groups, *kernel]; a transposed one as
[in, out/groups, *kernel], so its units are gathered across groups (LayerType.transposed).
"""
from torch import nn

from . import LayerType, register

CONV = {n: LayerType(f"conv{n}d", spatial_dims=n) for n in (1, 2, 3)}
CONV_TRANSPOSE = {n: LayerType(f"conv_transpose{n}d", spatial_dims=n, transposed=True) for n in (1, 2, 3)}

register(nn.Conv1d, layer_type=CONV[1])
register(nn.Conv2d, layer_type=CONV[2])
register(nn.Conv3d, layer_type=CONV[3])
register(nn.ConvTranspose1d, layer_type=CONV_TRANSPOSE[1])
register(nn.ConvTranspose2d, layer_type=CONV_TRANSPOSE[2])
register(nn.ConvTranspose3d, layer_type=CONV_TRANSPOSE[3])
