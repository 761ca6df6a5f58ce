"""Registry of the layer types whose output is linear in their weight.

One file per family registers a :class:`LayerType` for its classes with :func:`register`.
:func:`layer_type_of` resolves a module through its class hierarchy, but a subclass that
overrides ``forward`` (timm's ``StdConv2d``) is never silently treated as its parent: it must be
registered itself, or it is refused with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn


@dataclass(frozen=True)
class LayerType:
    """How a family of layers maps its weight onto output units.

    spatial_dims: number of spatial dimensions after the channel dimension of the output
        (0 for Linear, whose units are the last dimension).
    transposed: weight stored as [in, out/groups, ...] (transposed convolutions).
    """

    name: str
    spatial_dims: int
    transposed: bool = False

    def channel_dim(self, output: torch.Tensor) -> int:
        """Dimension of ``output`` that indexes the output units."""
        return output.dim() - 1 - self.spatial_dims

    def unit_weights(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The weight as a [units, fan_in] view (a copy only for transposed layers)."""
        if not self.transposed:
            return weight.reshape(weight.shape[0], -1)
        in_ch, out_per_group = weight.shape[0], weight.shape[1]
        w = weight.reshape(groups, in_ch // groups, out_per_group, -1)
        return w.transpose(1, 2).reshape(groups * out_per_group, -1)

    def per_unit(self, values: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """A [units] vector broadcastable against ``weight`` (expanded across groups when transposed)."""
        if not self.transposed:
            return values.view(-1, *([1] * (weight.dim() - 1)))
        in_ch, out_per_group = weight.shape[0], weight.shape[1]
        v = values.view(groups, 1, out_per_group, *([1] * (weight.dim() - 2)))
        return v.expand(groups, in_ch // groups, out_per_group, *([1] * (weight.dim() - 2))).reshape(
            in_ch, out_per_group, *([1] * (weight.dim() - 2)))

    def num_units(self, weight: torch.Tensor, groups: int = 1) -> int:
        return weight.shape[1] * groups if self.transposed else weight.shape[0]


_REGISTRY: Dict[type, LayerType] = {}
# Methods whose override by a subclass means "computes its output differently".
_FORWARD_METHODS = ("forward", "_conv_forward")


def register(*classes: type, layer_type: LayerType) -> None:
    """Declare that ``classes`` compute an output linear in ``weight`` as ``layer_type`` says."""
    for cls in classes:
        _REGISTRY[cls] = layer_type


class UnsupportedLayer(TypeError):
    """A module that hebbloss cannot make plastic, with the reason."""


def _reason_unsupported(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be plastic, or None when it can."""
    cls = type(module)
    for base in cls.__mro__:
        if base in _REGISTRY:
            break
    else:
        return f"{cls.__name__} is not a registered layer type (supported: {', '.join(sorted({c.__name__ for c in _REGISTRY}))})"
    for method in _FORWARD_METHODS:
        if getattr(cls, method, None) is not getattr(base, method, None):
            return (
                f"{cls.__name__} overrides {method}() of {base.__name__}, so its output need not be linear in its "
                f"weight (timm's StdConv2d standardises the weight there); register it with "
                f"hebbloss.layers.register({cls.__name__}, layer_type=...) if its output is W*x + b"
            )
    if torch.nn.utils.parametrize.is_parametrized(module):
        return f"{cls.__name__} has a parametrized weight (e.g. weight norm), so its output is not linear in the stored weight"
    if hasattr(module, "weight_g") or hasattr(module, "weight_v"):
        how = "spectral_norm" if hasattr(module, "weight_u") else "weight_norm"
        return f"{cls.__name__} uses {how}, which derives its weight in forward, so its output is not linear in the stored weight"
    if not isinstance(getattr(module, "weight", None), nn.Parameter) and not _is_pruned(module):
        return f"{cls.__name__} has no weight Parameter (lazy or derived weight)"
    return None


def _is_pruned(module: nn.Module) -> bool:
    """True when torch.nn.utils.prune computes ``weight = weight_orig * weight_mask``."""
    return isinstance(getattr(module, "weight_orig", None), nn.Parameter) and hasattr(module, "weight_mask")


def layer_type_of(module: nn.Module) -> LayerType:
    """The :class:`LayerType` of ``module``; raises :class:`UnsupportedLayer` with the reason."""
    reason = _reason_unsupported(module)
    if reason is not None:
        raise UnsupportedLayer(reason)
    for base in type(module).__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base]
    raise AssertionError("unreachable")


def is_supported(module: nn.Module) -> bool:
    """True when ``module`` can be made plastic."""
    return _reason_unsupported(module) is None


def has_registered_base(module: nn.Module) -> bool:
    """True when some class in ``module``'s hierarchy is registered (supported or refused)."""
    return any(base in _REGISTRY for base in type(module).__mro__)


def groups_of(module: nn.Module) -> int:
    return getattr(module, "groups", 1)


def plastic_weight(module: nn.Module) -> nn.Parameter:
    """The weight Parameter a rule updates: ``weight_orig`` when pruned, else ``weight``."""
    return module.weight_orig if _is_pruned(module) else module.weight


def plastic_parameters(module: nn.Module) -> Tuple[nn.Parameter, ...]:
    """The parameters a rule updates: :func:`plastic_weight` and the bias."""
    weight = plastic_weight(module)
    return (weight,) if module.bias is None else (weight, module.bias)


from . import linear, conv, timm_layers  # noqa: E402,F401  (registration side effects)
