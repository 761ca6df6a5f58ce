"""Where the feedback weights B of each mode come from.

- ``bp``: B = W (backprop, through the same code path, for comparisons).
- ``fa``: B fixed and random (feedback alignment; Lillicrap et al. 2016).
- ``usf``: B = s * sign(W), with s a scale fixed once, at conversion (uniform sign-concordant
  feedback, uSF). Liao, Leibo & Poggio 2016 ("How important is weight symmetry in backpropagation?",
  AAAI) define B = sign(W); Moskovitz, Litwin-Kumar & Abbott 2018 ("Feedback alignment in deep
  convolutional networks", arXiv:1812.06488) train deep convolutional networks with it, and their
  reference implementation in BioTorch (Jimenez Sanfiz & Akrout 2021, ``biotorch/layers/
  fa_constructor``) multiplies sign(W) by the standard deviation of the layer's initialisation, a
  constant (after Xiao et al. 2018, arXiv:1811.03567): sqrt(2 / (fan_in + fan_out)) for Xavier,
  1 / sqrt(3 fan_in) for PyTorch's default. Here s is a persistent 0-dim buffer ``feedback_scale``,
  by default the standard deviation of W when convert() runs (that of its initialisation when the
  model is converted right after it is built); see :func:`usf_scale`. Until this version s was
  rms(W) recomputed at every step, which is not the papers' rule.
- ``frsf``: B = |M| * sign(W), M fixed and random; ``brsf``: M redrawn at every training batch
  (Moskovitz et al. 2018, frSF and brSF; B = M o sign(W) with M's magnitudes random).
- ``urfb``: B trainable, given exactly W's gradient delta x^T, so W - B stays constant under SGD
  (Amit 2019, "Deep learning with asymmetric connections and Hebbian updates").
- ``kp``: ``urfb`` plus weight decay on W and B, so W - B shrinks by (1 - lr * decay) per step
  (Kolen & Pollack 1994; Akrout et al. 2019).
Random B (or M) is drawn elementwise from N(0, std(W)), so its scale matches the layer's weight.
Weight decay for urfb/kp as their authors apply it: :func:`hebbloss.feedback.param_groups`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

FEEDBACK_WEIGHT = "feedback_weight"
FEEDBACK_MAGNITUDE = "feedback_magnitude"
FEEDBACK_SCALE = "feedback_scale"
Init = Union[str, Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class Mode:
    """One feedback mode: which entry it adds to a layer and how B is formed from it."""

    name: str
    entry: Optional[str] = None  # FEEDBACK_WEIGHT, FEEDBACK_MAGNITUDE or FEEDBACK_SCALE (a 0-dim tensor)
    trainable: bool = False  # B is an nn.Parameter that receives W's gradient
    redraw: bool = False  # the magnitude is redrawn at every training forward pass
    decays: bool = False  # weight decay on W and B (Kolen-Pollack)

    def feedback(self, module: nn.Module) -> torch.Tensor:
        """The feedback weight B of ``module`` for the forward pass under way."""
        weight = module.weight
        if self.name == "bp":
            return weight.detach()
        stored = getattr(module, self.entry)
        if self.entry == FEEDBACK_SCALE:
            return torch.sign(weight.detach()) * stored
        if self.entry == FEEDBACK_MAGNITUDE:
            return stored.abs() * torch.sign(weight.detach())
        return stored


MODES: Dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("bp"),
        Mode("fa", entry=FEEDBACK_WEIGHT),
        Mode("usf", entry=FEEDBACK_SCALE),
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


def fans(weight: torch.Tensor) -> "tuple[int, int]":
    """(fan_in, fan_out) of a layer's weight as torch.nn.init counts them; an untied weight
    [oh, ow, out, in, kh, kw] counts one position's filter bank."""
    shape = tuple(weight.shape[-4:]) if weight.dim() == 6 else tuple(weight.shape)
    if len(shape) < 2:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} has no fan-in and fan-out")
    receptive = 1
    for n in shape[2:]:
        receptive *= n
    return shape[1] * receptive, shape[0] * receptive


USF_SCALES = ("std", "xavier", "kaiming")


def usf_scale(weight: torch.Tensor, init: Init = "std") -> float:
    """The fixed scale s of uSF's B = s * sign(W) for a layer of weight ``weight``:

    - "std": the standard deviation of W now (at conversion: that of its initialisation);
    - "xavier": sqrt(2 / (fan_in + fan_out)), the standard deviation of Xavier (Glorot) uniform
      initialisation, BioTorch's scale with ``init: xavier``;
    - "kaiming": 1 / sqrt(3 fan_in), that of PyTorch's default kaiming_uniform_(a=sqrt(5)), BioTorch's
      scale otherwise;
    - a number, or a callable(weight) -> number.
    """
    w = weight.detach()
    if isinstance(init, str):
        if init == "std":
            return float(w.double().std()) if w.numel() > 1 else float(w.double().abs().mean())
        fan_in, fan_out = fans(w)
        if init == "xavier":
            return (2.0 / (fan_in + fan_out)) ** 0.5
        if init == "kaiming":
            return 1.0 / (3.0 * fan_in) ** 0.5
        raise ValueError(f"the uSF scale init must be one of {', '.join(USF_SCALES)}, a number or a "
                         f"callable(weight) -> number, got {init!r}")
    value = init(w.clone()) if callable(init) else init
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the uSF scale must be a number, got {value!r}") from None
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"the uSF scale must be a finite number > 0, got {value}")
    return value


def initial_entry(mode: Mode, weight: torch.Tensor, init: Optional[Init], generator: Optional[torch.Generator]) -> torch.Tensor:
    """The initial value of ``mode``'s entry for a layer of weight ``weight``.

    init (fa, frsf, brsf, urfb, kp): "random" (N(0, std W), the default), "weight" (a copy of W:
    ``urfb``/``kp`` then start as backprop), or a callable mapping W to a tensor of its shape.
    init (usf): the fixed scale s, see :func:`usf_scale` (default "std"); a 0-dim tensor.
    """
    if mode.entry == FEEDBACK_SCALE:
        scale = usf_scale(weight, "std" if init is None else init)
        return torch.tensor(scale, dtype=weight.dtype, device=weight.device)
    if init is None:
        init = "random"
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
