"""timm's layers whose forward differs from their torch parent but stays linear in the weight.

- ``Conv2dSame`` pads its input dynamically ("SAME" padding of TensorFlow), then convolves with
  the plain weight: the output is still W*x + b; its adjoint undoes that padding.
- ``timm.layers.Linear`` only casts the weight for TorchScript.
``StdConv2d``/``ScaledStdConv2d`` standardise the weight inside forward and stay unregistered,
so they are refused with the reason (they override ``forward`` of ``nn.Conv2d``).
They are registered by qualified name, so that importing hebbloss does not import timm.
"""
from . import register
from .conv import Convolution, symmetric_or_explicit
from .linear import LINEAR

register("timm.layers.linear.Linear", layer_type=LINEAR)


@register("timm.layers.conv2d_same.Conv2dSame")
class Conv2dSame(Convolution):
    """nn.Conv2d after TensorFlow "SAME" padding, computed from each input's size."""

    name, spatial_dims = "conv2d_same", 2

    def of(self, module):
        return self

    def geometry(self, module, x, output=None):
        from timm.layers.padding import pad_same_arg  # timm is loaded: a Conv2dSame exists

        common = dict(dims=2, stride=tuple(module.stride), dilation=tuple(module.dilation), groups=module.groups)
        pads = pad_same_arg(list(x.shape[-2:]), list(module.weight.shape[-2:]), module.stride, module.dilation)
        return symmetric_or_explicit(pads, "constant", common)
