"""A reference network's training recipe as data: per-layer rule, post signal and learning rate,
batch size, epochs, and the optimizer extras (Miconi 2021; Journe et al. 2023).

    model = hebbloss.models.create("miconi2021")
    plastic = model.recipe.attach(model)          # hebbloss.attach with the per-layer settings
    optimizer = model.recipe.optimizer(plastic)   # torch.optim.SGD, one param group per layer
    for step, x in enumerate(batches_of(model.recipe.batch_size)):
        optimizer.zero_grad(); model(x); loss = plastic.loss()
        if step >= model.recipe.warmup_steps:     # warm-up batches only adapt thresholds
            loss.backward(); optimizer.step()

Save ``plastic.state_dict()`` (the state of post modules, e.g. k-WTA thresholds) beside
``model.state_dict()``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import nn

from .. import optim
from ..attach import Plasticity, attach
from ..data.augment import check_name


@dataclass
class LayerRecipe:
    """How one plastic layer learns: its rule, its post signal (a prototype module, which ``attach``
    copies per layer, or a plain callable, used as is) and its SGD learning rate."""

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
    warmup_steps: first batches that run forward (adapting thresholds) with no weight update.
    paper: where the numbers come from.
    notes: deviations from the authors' code and other facts a reader needs, as plain strings.
    augment: augmentation of the Hebbian training batches, by name for
        ``hebbloss.data.augment.augment`` (None, or "hflip": Miconi 2021).
    zca: ZCA settings of the input (``hebbloss.zca.fit_zca``; None: no whitening), e.g.
        ``hebbloss.zca.MICONI2021``.
    readout: the paper's linear readout as plain data (layer read, features, optimizer...).
    """

    name: str
    layers: Dict[str, LayerRecipe]
    batch_size: int
    epochs: int
    renormalize: bool = False
    softhebb_power: Optional[float] = None
    reduction: str = "sum"
    warmup_steps: int = 0
    paper: str = ""
    notes: Dict[str, str] = field(default_factory=dict)
    augment: Optional[str] = None
    zca: Optional[Dict[str, Any]] = None
    readout: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        try:
            check_name(self.augment)
        except ValueError as e:
            raise ValueError(f"recipe {self.name}: {e}") from None

    def attach(self, model: nn.Module, streaming: bool = False) -> Plasticity:
        """``hebbloss.attach`` on the recipe's layers with their rules and post signals (``streaming``:
        as in ``attach``, the same updates taken during the forward)."""
        first = next(iter(self.layers.values()))
        overrides = {name: {"rule": lay.rule, "post": lay.post} for name, lay in self.layers.items()}
        return attach(model, rule=first.rule, targets=list(self.layers), overrides=overrides, reduction=self.reduction,
                      streaming=streaming)

    def optimizer(self, plastic: Plasticity) -> torch.optim.SGD:
        """Plain SGD with one param group per layer at its learning rate, plus the recipe's step
        hooks (filter renormalisation, SoftHebb scaling), all from ``hebbloss.optim``; the hooks
        live as long as the optimizer."""
        missing = [n for n in self.layers if n not in plastic.layers]
        if missing:
            raise ValueError(f"recipe {self.name}: layers {missing} are not plastic in this handle; build it with recipe.attach(model)")
        chosen = {n: plastic.layers[n] for n in self.layers}
        opt = torch.optim.SGD(optim.param_groups(chosen, {n: lay.lr for n, lay in self.layers.items()}), lr=0.0)
        if self.softhebb_power is not None:
            optim.scale_updates(opt, chosen, power=self.softhebb_power)
        if self.renormalize:
            optim.renormalize_after_step(opt, chosen.values())
        return opt

    def to_dict(self) -> dict:
        """The recipe as plain data (post signals by their repr), e.g. to log a run's settings."""
        return {
            "name": self.name, "batch_size": self.batch_size, "epochs": self.epochs,
            "renormalize": self.renormalize, "softhebb_power": self.softhebb_power, "reduction": self.reduction,
            "warmup_steps": self.warmup_steps,
            "paper": self.paper, "notes": dict(self.notes),
            "augment": self.augment, "zca": None if self.zca is None else dict(self.zca),
            "readout": copy.deepcopy(self.readout),
            "layers": {n: {"rule": l.rule, "post": repr(l.post), "lr": l.lr} for n, l in self.layers.items()},
        }

    def copy(self) -> "Recipe":
        """A copy whose settings can be changed freely; the post signals themselves are shared
        (``attach`` copies post modules, and a callable post may read the model's own state)."""
        return dataclasses.replace(self, layers={n: dataclasses.replace(l) for n, l in self.layers.items()},
                                   notes=dict(self.notes), zca=None if self.zca is None else dict(self.zca),
                                   readout=copy.deepcopy(self.readout))
