"""Per-unit views of a plastic layer's weight: its effective weight (pruned or not), the norm of
each unit's weight vector, and per-unit scaling in the weight's own layout (Miconi 2021).
"""
from __future__ import annotations

import torch
from torch import nn

from . import layers


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer computes with: ``weight_orig * weight_mask`` when pruned, else ``weight``."""
    if layers.is_pruned(module):
        return module.weight_orig * module.weight_mask
    return module.weight


def unit_norms(module: nn.Module) -> torch.Tensor:
    """L2 norm of each output unit's effective weight vector, shape [units]."""
    kind = layers.layer_type_of(module)
    return kind.unit_weights(effective_weight(module), layers.groups_of(module)).norm(dim=1)


def per_unit(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """A [units] vector broadcast to the layout of the module's weight (transposed convs included)."""
    weight = effective_weight(module)
    kind = layers.layer_type_of(module)
    return kind.per_unit(values.to(weight), weight, layers.groups_of(module)).expand_as(weight)
