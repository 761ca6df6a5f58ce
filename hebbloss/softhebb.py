"""SoftHebb's training extras on stock PyTorch optimizers (Journe et al. 2023, "Hebbian deep
learning without feedback", ICLR).

The rule itself is ``hebbloss.rules.SoftHebb`` (dW = y (x - u W)) with the post signal
``hebbloss.competition.SoftWTA``. The paper then, per layer and per step,
- divides the update by its largest absolute entry (max-abs normalisation), and
- scales each neuron's learning rate by |norm(W_c) - 1| ** 0.5, so that it slows down as the
  neuron's weight vector converges to the unit sphere.
:func:`scale_updates` does both in a step pre-hook of any torch optimizer (use SGD, as the paper
does: Adam would undo any per-neuron scaling of the gradient); :func:`param_groups` gives one
param group per layer with its learning rate eta. :func:`init_radius` is the paper's initialisation.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from . import layers, units
from .hooks import HookOwner

LayersLike = Union[Mapping[str, nn.Module], "object"]  # a name->module mapping or a Plasticity handle


def maxabs_normalize(grads: List[torch.Tensor], eps: float = 1e-30) -> List[torch.Tensor]:
    """The tensors divided by the largest absolute entry among all of them (Journe et al. 2023)."""
    peak = torch.stack([g.abs().amax() for g in grads]).amax()
    return [g / (peak + eps) for g in grads]


def norm_rate(norms: torch.Tensor, power: float = 0.5, eps: float = 1e-10) -> torch.Tensor:
    """Per-neuron learning-rate factor (|norm_c - 1| + eps) ** power (Journe et al. 2023)."""
    return ((norms - 1).abs() + eps).pow(power)


def _layers_of(plastic: LayersLike) -> Dict[str, nn.Module]:
    found = getattr(plastic, "layers", plastic)
    if not isinstance(found, Mapping):
        raise TypeError(f"expected a Plasticity handle or a {{name: layer}} mapping, got {type(plastic).__name__}")
    return dict(found)


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
        """Normalise and scale the gradients now (what the hook does before each step)."""
        for name, module in self.layers.items():
            params = [p for p in layers.plastic_parameters(module) if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if self.normalize:
                grads = maxabs_normalize(grads)
            rate = norm_rate(units.unit_norms(module), self.power)
            for p, g in zip(params, grads):
                scale = units.per_unit(module, rate) if p.dim() > 1 else rate.to(g)
                p.grad.copy_(g * scale)

    def _before_step(self, optimizer, args, kwargs):
        self.apply()

    def remove(self) -> None:
        self._hooks.remove()


def scale_updates(optimizer: torch.optim.Optimizer, plastic: LayersLike, power: float = 0.5,
                  normalize: bool = True) -> UpdateScaling:
    """Before every ``optimizer.step()``, divide each layer's gradient by its max-abs entry
    (``normalize``) and scale neuron c's by |norm(W_c) - 1| ** power (Journe et al. 2023).

    plastic: the handle from ``hebbloss.attach`` or a {name: layer} mapping. Returns the
    :class:`UpdateScaling`, whose ``remove()`` takes the hook off.
    """
    chosen = _layers_of(plastic)
    if not (float(power) >= 0 and math.isfinite(power)):
        raise ValueError(f"scale_updates: power must be a finite number >= 0, got {power!r}")
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n or "(model)" for n, m in chosen.items() if not all(id(p) in in_optimizer for p in layers.plastic_parameters(m))]
    if missing:
        raise ValueError(f"scale_updates: the parameters of layers {', '.join(missing)} are not in the optimizer; "
                         "build it from plastic.plastic_parameters() or softhebb.param_groups(plastic, ...)")
    return UpdateScaling(optimizer, chosen, float(power), bool(normalize))


def param_groups(plastic: LayersLike, lr: Union[float, Mapping[str, float]]) -> List[dict]:
    """One optimizer param group per plastic layer, with learning rate ``lr`` (a number, or
    {layer name: eta}, e.g. the paper's 0.08 / 0.005 / 0.01)."""
    chosen = _layers_of(plastic)
    if isinstance(lr, Mapping):
        unknown = set(lr) - set(chosen)
        missing = set(chosen) - set(lr)
        if unknown or missing:
            raise ValueError(f"param_groups: learning rates given for {sorted(unknown)} (not plastic) and missing "
                             f"for {sorted(missing)}; the plastic layers are {sorted(chosen)}")
    groups = []
    for name, module in chosen.items():
        eta = lr[name] if isinstance(lr, Mapping) else lr
        if not (float(eta) >= 0 and math.isfinite(eta)):
            raise ValueError(f"param_groups: the learning rate of layer '{name}' must be finite and >= 0, got {eta!r}")
        groups.append({"params": list(layers.plastic_parameters(module)), "lr": float(eta)})
    return groups


@torch.no_grad()
def init_radius(module: nn.Module, radius: float = 25.0, generator: Optional[torch.Generator] = None) -> nn.Module:
    """SoftHebb's initialisation: weight ~ N(0, (radius / sqrt(fan_in))^2), so each neuron's
    weight vector starts with norm close to ``radius`` (25 for the paper's convolutions); bias
    zeroed. Returns the module."""
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
