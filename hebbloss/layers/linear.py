"""nn.Linear: z = x W^T + b over any leading dimensions; units are the last dimension."""
from torch import nn

from . import LayerType, register

LINEAR = LayerType("linear", spatial_dims=0)
register(nn.Linear, layer_type=LINEAR)
