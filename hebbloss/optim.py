"""Optimizer extras of the Hebbian papers, on stock PyTorch optimizers.

- :func:`param_groups`: one optimizer param group per plastic layer with its own learning rate
  (a number, {layer: lr}, and/or {pattern: lr}); used by the reference networks' recipes and the
  ``hebbloss`` command line alike.
- :func:`scale_updates`: SoftHebb's learning-rate scaling (Journe, Garcia Rodriguez, Guo &
  Moraitis 2023, "Hebbian deep learning without feedback", ICLR): per layer and per step, the
  update divided by its largest absolute entry, and neuron c's learning rate scaled by
  |norm(W_c) - 1| ** 0.5 so that it slows down as its weight vector reaches the unit sphere.
  A step pre-hook; use SGD, as the paper does (Adam would undo any per-neuron gradient scale).
- :func:`renormalize_filters` and :func:`renormalize_after_step`: unit-norm filters after every
  step (Miconi 2021, "Multi-layer Hebbian networks with modern deep learning frameworks",
  arXiv:2107.01729). A step post-hook.

The hooks are removable (``remove()`` may be called twice) and are checked before they are placed.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _units as units, layers
from ._hooks import HookOwner
from .selection import name_matches

LayersLike = Union[Mapping[str, nn.Module], "object"]  # a name->module mapping or a Plasticity handle
Rate = Union[float, Mapping[str, float]]


def _layers_of(plastic: LayersLike) -> Dict[str, nn.Module]:
    found = getattr(plastic, "layers", plastic)
    if not isinstance(found, Mapping):
        raise TypeError(f"expected a Plasticity handle or a {{name: layer}} mapping, got {type(plastic).__name__}")
    return dict(found)


def _number(value, what: str, positive: bool = False) -> float:
    """``value`` as a float, refused unless it is a finite real number >= 0 (> 0 if ``positive``)."""
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{what} must be a finite number {bound}, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------- per-layer rates
def learning_rates(names: Iterable[str], lr: Rate, layer_lr: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """Each layer's learning rate, {name: lr}: ``lr`` (one number for every layer, or {name: lr}
    naming exactly these layers), then every ``layer_lr`` pattern (exact name, suffix, glob or
    regex, as in ``hebbloss.select_layers``) that matches the name, the last one winning.

    Raises ValueError, naming the layers, for a map that misses or invents layers, a pattern that
    matches no layer, or a rate that is not a finite number >= 0.
    """
    names = list(names)
    if isinstance(lr, Mapping):
        unknown, missing = set(lr) - set(names), set(names) - set(lr)
        if unknown or missing:
            raise ValueError(f"learning rates given for {sorted(unknown)} (not plastic) and missing "
                             f"for {sorted(missing)}; the plastic layers are {sorted(names)}")
    layer_lr = dict(layer_lr or {})
    for pattern in layer_lr:
        if not any(name_matches(pattern, n) for n in names):
            raise ValueError(f"layer_lr pattern {pattern!r} matches none of the plastic layers: {', '.join(names)}")
    rates = {}
    for name in names:
        rate = lr[name] if isinstance(lr, Mapping) else lr
        for pattern, value in layer_lr.items():
            if name_matches(pattern, name):
                rate = value
        rates[name] = _number(rate, f"the learning rate of layer '{name}'")
    return rates


def param_groups(plastic: LayersLike, lr: Rate, layer_lr: Optional[Mapping[str, float]] = None) -> List[dict]:
    """One optimizer param group per plastic layer, ``{"params", "lr", "name"}``, in model order;
    the rates are :func:`learning_rates` (e.g. SoftHebb's {"conv1": 0.08, "conv2": 0.005, "conv3":
    0.01}, or ``lr=1e-3, layer_lr={"layer4.*": 1e-4}``). Every plastic parameter is in exactly one group.

    plastic: the handle from ``hebbloss.attach`` or a {name: layer} mapping.
    """
    chosen = _layers_of(plastic)
    rates = learning_rates(chosen, lr, layer_lr)
    return [{"params": list(layers.plastic_parameters(m)), "lr": rates[n], "name": n} for n, m in chosen.items()]


# -------------------------------------------------------------- SoftHebb learning-rate scaling
MAXABS_EPS = 1e-30  # added to the max-abs entry before dividing by it


def _maxabs(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The largest absolute entry among all the tensors (a 0-d tensor), read without an ``abs()`` copy."""
    return torch.stack([torch.linalg.vector_norm(g, ord=math.inf) for g in grads]).amax()


def maxabs_normalize(grads: List[torch.Tensor], eps: float = MAXABS_EPS) -> List[torch.Tensor]:
    """The tensors divided by the largest absolute entry among all of them (Journe et al. 2023)."""
    peak = _maxabs(grads)
    return [g / (peak + eps) for g in grads]


def norm_rate(norms: torch.Tensor, power: float = 0.5, eps: float = 1e-10) -> torch.Tensor:
    """Per-neuron learning-rate factor (|norm_c - 1| + eps) ** power (Journe et al. 2023)."""
    return ((norms - 1).abs() + eps).pow(power)


class UpdateScaling:
    """The hook placed by :func:`scale_updates`; :meth:`remove` takes it off the optimizer."""

    def __init__(self, optimizer, chosen: Dict[str, nn.Module], power: float, normalize: bool):
        self.layers = chosen
        self.power = power
        self.normalize = normalize
        self._hooks = HookOwner()
        self._hooks.add(optimizer.register_step_pre_hook(self._before_step))

    @torch.no_grad()
    def apply(self) -> None:
        """Normalise and scale the gradients now (what the hook does before each step): per layer,
        grad * rate_c / peak, with the max-abs ``peak`` folded into the per-unit rate so that each
        gradient is read twice (its peak, then one in-place multiply) and nothing gradient-sized is
        allocated; equal to :func:`maxabs_normalize` then the rate, up to float rounding."""
        for module in self.layers.values():
            params = [p for p in layers.plastic_parameters(module) if p.grad is not None]
            if not params:
                continue
            rate = norm_rate(units.unit_norms(module), self.power)
            if self.normalize:
                rate = rate / (_maxabs([p.grad for p in params]).to(rate) + MAXABS_EPS)
            for p in params:
                p.grad.mul_(units.per_unit(module, rate) if p.dim() > 1 else rate.to(p.grad))

    def _before_step(self, optimizer, args, kwargs):
        self.apply()

    def remove(self) -> None:
        """Take the hook off (a second call does nothing)."""
        self._hooks.remove()


def scale_updates(optimizer: torch.optim.Optimizer, plastic: LayersLike, power: float = 0.5,
                  normalize: bool = True) -> UpdateScaling:
    """Before every ``optimizer.step()``, divide each layer's gradient by its max-abs entry
    (``normalize``) and scale neuron c's by |norm(W_c) - 1| ** power (Journe et al. 2023); the
    norm is that of the effective weight (``weight_orig * weight_mask`` for pruned layers).

    plastic: the handle from ``hebbloss.attach`` or a {name: layer} mapping. Returns the
    :class:`UpdateScaling`, whose ``remove()`` takes the hook off.
    """
    chosen = _layers_of(plastic)
    power = _number(power, "scale_updates: power")
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n or "(model)" for n, m in chosen.items() if not all(id(p) in in_optimizer for p in layers.plastic_parameters(m))]
    if missing:
        raise ValueError(f"scale_updates: the parameters of layers {', '.join(missing)} are not in the optimizer; "
                         "build it from plastic.plastic_parameters() or hebbloss.optim.param_groups(plastic, ...)")
    return UpdateScaling(optimizer, chosen, power, bool(normalize))


# ------------------------------------------------------------------------ unit-norm filters
@torch.no_grad()
def renormalize_filters(module: nn.Module, norm: float = 1.0, eps: float = 1e-10) -> nn.Module:
    """Rescale each output unit's effective weight to L2 norm ``norm`` (Miconi 2021's unit-norm
    filters); pruned entries stay zero, and a unit whose every connection is pruned (norm 0) is left
    as it is. Returns the module."""
    norm = _number(norm, f"renormalize_filters({type(module).__name__}): norm", positive=True)
    param = layers.plastic_weight(module)
    norms = units.unit_norms(module)
    factor = torch.where(norms > eps, norm / norms.clamp_min(eps), torch.ones_like(norms))
    param.mul_(units.per_unit(module, factor))
    return module


def renormalize_after_step(optimizer: torch.optim.Optimizer, modules: Iterable[nn.Module], norm: float = 1.0) -> RemovableHandle:
    """Register a step post-hook on ``optimizer`` that calls :func:`renormalize_filters` on each
    module after every ``optimizer.step()`` (Miconi 2021); returns the removable handle."""
    modules = list(modules)
    norm = _number(norm, "renormalize_after_step: norm", positive=True)
    for m in modules:
        units.unit_norms(m)  # refuses unsupported layers now, not at the first step

    def hook(opt, args, kwargs):
        for m in modules:
            renormalize_filters(m, norm)

    return optimizer.register_step_post_hook(hook)
