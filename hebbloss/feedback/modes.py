"""Where the feedback weights B of each mode come from.

- ``bp``: B = W (backprop, through the same code path, for comparisons).
- ``fa``: B fixed and random (feedback alignment; Lillicrap et al. 2016).
- ``usf``: B = sign(W) * rms(W) (uniform sign-concordant feedback; Liao, Leibo & Poggio 2016,
  Moskovitz, Litwin-Kumar & Abbott 2018).
- ``frsf``: B = |M| * sign(W), M fixed and random; ``brsf``: M redrawn at every training batch.
- ``urfb``: B trainable, given exactly W's gradient delta x^T, so W - B stays constant under SGD
  (Amit 2019, "Deep learning with asymmetric connections and Hebbian updates").
- ``kp``: ``urfb`` plus weight decay on W and B, so W - B shrinks by (1 - lr * decay) per step
  (Kolen & Pollack 1994; Akrout et al. 2019).
Random B (or M) is drawn elementwise from N(0, std(W)), so its scale matches the layer's weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

FEEDBACK_WEIGHT = "feedback_weight"
FEEDBACK_MAGNITUDE = "feedback_magnitude"
Init = Union[str, Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class Mode:
    """One feedback mode: which entry it adds to a layer and how B is formed from it."""

    name: str
    entry: Optional[str] = None  # FEEDBACK_WEIGHT or FEEDBACK_MAGNITUDE
    trainable: bool = False  # B is an nn.Parameter that receives W's gradient
    redraw: bool = False  # the magnitude is redrawn at every training forward pass
    decays: bool = False  # weight decay on W and B (Kolen-Pollack)

    def feedback(self, module: nn.Module) -> torch.Tensor:
        """The feedback weight B of ``module`` for the forward pass under way."""
        weight = module.weight
        if self.name == "bp":
            return weight.detach()
        if self.name == "usf":
            w = weight.detach()
            return torch.sign(w) * w.pow(2).mean().sqrt()
        stored = getattr(module, self.entry)
        if self.entry == FEEDBACK_MAGNITUDE:
            return stored.abs() * torch.sign(weight.detach())
        return stored


MODES: Dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("bp"),
        Mode("fa", entry=FEEDBACK_WEIGHT),
        Mode("usf"),
        Mode("frsf", entry=FEEDBACK_MAGNITUDE),
        Mode("brsf", entry=FEEDBACK_MAGNITUDE, redraw=True),
        Mode("urfb", entry=FEEDBACK_WEIGHT, trainable=True),
        Mode("kp", entry=FEEDBACK_WEIGHT, trainable=True, decays=True),
    )
}


def get(mode: Union[str, Mode]) -> Mode:
    """The :class:`Mode` called ``mode``; raises ValueError listing the modes otherwise."""
    if isinstance(mode, Mode):
        return mode
    if isinstance(mode, str) and mode.lower() in MODES:
        return MODES[mode.lower()]
    raise ValueError(f"unknown feedback mode {mode!r}; choose one of: {', '.join(MODES)}")


def random_like(weight: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Elementwise N(0, std(W)) of W's shape, dtype and device."""
    w = weight.detach()
    std = w.float().std() if w.numel() > 1 else w.float().abs().mean()
    noise = torch.randn(w.shape, generator=generator, dtype=torch.float32, device=generator.device if generator else w.device)
    return (noise.to(w.device) * std).to(w.dtype)


def initial_entry(mode: Mode, weight: torch.Tensor, init: Init, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The initial value of ``mode``'s entry for a layer of weight ``weight``.

    init: "random" (N(0, std W)), "weight" (a copy of W: ``urfb``/``kp`` then start as backprop),
    or a callable mapping W to a tensor of its shape.
    """
    if init == "random":
        value = random_like(weight, generator)
    elif init == "weight":
        value = weight.detach().clone()
    elif callable(init):
        value = torch.as_tensor(init(weight.detach().clone())).to(weight.device, weight.dtype)
    else:
        raise ValueError(f"init must be 'random', 'weight' or a callable(weight) -> tensor, got {init!r}")
    if value.shape != weight.shape:
        raise ValueError(f"init returned shape {tuple(value.shape)}, but the weight has shape {tuple(weight.shape)}")
    return value
