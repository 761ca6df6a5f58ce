"""A reference network's training recipe as data: per-layer rule, post signal and learning rate,
batch size, epochs, and the optimizer extras (Miconi 2021; Journe et al. 2023).

    model = hebbloss.models.create("miconi2021")
    plastic = model.recipe.attach(model)          # hebbloss.attach with the per-layer settings
    optimizer = model.recipe.optimizer(plastic)   # torch.optim.SGD, one param group per layer
    for x in batches_of(model.recipe.batch_size):
        optimizer.zero_grad(); model(x); plastic.loss().backward(); optimizer.step()

Save ``plastic.state_dict()`` (thresholds of the post signals) beside ``model.state_dict()``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from .. import prune, softhebb
from ..attach import Plasticity, attach


@dataclass
class LayerRecipe:
    """How one plastic layer learns: its rule, its post signal (a prototype module, copied by
    ``attach``) and its SGD learning rate."""

    rule: str
    post: Optional[nn.Module]
    lr: float


@dataclass
class Recipe:
    """Everything needed to train a reference network with hebbloss.

    layers: {plastic layer name: LayerRecipe}, in model order.
    batch_size, epochs: of the Hebbian phase, as in the paper.
    renormalize: rescale each filter to unit norm after every step (Miconi 2021).
    softhebb_power: if set, max-abs normalise each layer's update and scale neuron c's learning
        rate by |norm(W_c) - 1| ** power before every step (Journe et al. 2023).
    reduction: of the surrogate loss ("sum": the learning rates are per batch, as in the papers).
    paper: where the numbers come from.
    """

    name: str
    layers: Dict[str, LayerRecipe]
    batch_size: int
    epochs: int
    renormalize: bool = False
    softhebb_power: Optional[float] = None
    reduction: str = "sum"
    paper: str = ""
    notes: Dict[str, str] = field(default_factory=dict)

    def attach(self, model: nn.Module) -> Plasticity:
        """``hebbloss.attach`` on the recipe's layers with their rules and post signals."""
        first = next(iter(self.layers.values()))
        overrides = {name: {"rule": lay.rule, "post": lay.post} for name, lay in self.layers.items()}
        return attach(model, rule=first.rule, targets=list(self.layers), overrides=overrides, reduction=self.reduction)

    def optimizer(self, plastic: Plasticity) -> torch.optim.SGD:
        """Plain SGD with one param group per layer at its learning rate, plus the recipe's step
        hooks (filter renormalisation, SoftHebb scaling); the hooks live as long as the optimizer."""
        missing = [n for n in self.layers if n not in plastic.layers]
        if missing:
            raise ValueError(f"recipe {self.name}: layers {missing} are not plastic in this handle; build it with recipe.attach(model)")
        chosen = {n: plastic.layers[n] for n in self.layers}
        opt = torch.optim.SGD(softhebb.param_groups(chosen, {n: lay.lr for n, lay in self.layers.items()}), lr=0.0)
        if self.softhebb_power is not None:
            softhebb.scale_updates(opt, chosen, power=self.softhebb_power)
        if self.renormalize:
            prune.renormalize_after_step(opt, chosen.values())
        return opt

    def to_dict(self) -> dict:
        """The recipe as plain data (post signals by their repr), e.g. to log a run's settings."""
        return {
            "name": self.name, "batch_size": self.batch_size, "epochs": self.epochs,
            "renormalize": self.renormalize, "softhebb_power": self.softhebb_power, "reduction": self.reduction,
            "paper": self.paper, "notes": dict(self.notes),
            "layers": {n: {"rule": l.rule, "post": repr(l.post), "lr": l.lr} for n, l in self.layers.items()},
        }

    def copy(self) -> "Recipe":
        return copy.deepcopy(self)
