"""timm's layers whose forward differs from their torch parent but stays linear in the weight.

- ``Conv2dSame`` pads its input dynamically ("SAME" padding of TensorFlow), then convolves with
  the plain weight: the output is still W*x + b.
- ``timm.layers.Linear`` only casts the weight for TorchScript.
``StdConv2d``/``ScaledStdConv2d`` standardise the weight inside forward and stay unregistered,
so they are refused with the reason.
"""
from . import register
from .conv import CONV
from .linear import LINEAR

try:
    from timm.layers import Conv2dSame
    from timm.layers import Linear as TimmLinear
except ImportError:  # timm is a dependency, but keep the core importable without it
    pass
else:
    register(Conv2dSame, layer_type=CONV[2])
    register(TimmLinear, layer_type=LINEAR)
