"""Initialisations of a plastic layer's weights, in place, like ``torch.nn.init`` (any layer family
hebbloss supports: Linear, convolutions, transposed convolutions, pruned layers).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import layers


@torch.no_grad()
def init_radius(module: nn.Module, radius: float = 25.0, generator: Optional[torch.Generator] = None) -> nn.Module:
    """SoftHebb's initialisation (Journe et al. 2023, "Hebbian deep learning without feedback"):
    weight ~ N(0, (radius / sqrt(fan_in))^2), so each neuron's weight vector starts with norm close
    to ``radius`` (25 for the paper's convolutions); bias zeroed. Returns the module."""
    if not (float(radius) > 0 and math.isfinite(radius)):
        raise ValueError(f"init_radius: radius must be a finite number > 0, got {radius!r}")
    weight = layers.plastic_weight(module)
    kind = layers.layer_type_of(module)
    fan_in = kind.unit_weights(weight, layers.groups_of(module)).shape[1]
    noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
    weight.copy_(noise * (radius / math.sqrt(fan_in)))
    if getattr(module, "bias", None) is not None:
        module.bias.zero_()
    return module
