"""Optimizer param groups for a model converted by :func:`hebbloss.feedback.convert`, with weight
decay applied as each mode's authors apply it:

- ``bp``, ``fa``, ``usf``, ``frsf``, ``brsf``: every trainable parameter decays at ``weight_decay``
  (BioTorch, Jimenez Sanfiz & Akrout 2021, decays ``model.parameters()``; B and M are buffers);
- ``urfb``: the converted layers' W and B do not decay: Amit's code (github.com/yaliamit/URFB,
  README: "The only weight update method implemented is straight SGD") updates W and B by the same
  delta x^T and nothing else, so W - B stays what it was at initialisation. Decaying W alone (as an
  optimizer built from ``model.parameters()`` with weight decay does) makes W - B drift;
- ``kp``: W and B decay at the same rate, by the Kolen-Pollack decay that :func:`convert` adds to both
  gradients (``weight_decay=``), and by nothing else: Akrout et al. 2019 ("Deep learning without
  weight transport", NeurIPS), dW = -lr (delta x^T + lambda W), dB = -lr (delta x^T + lambda B), so
  W - B shrinks by (1 - lr lambda) at every plain SGD step. An optimizer decay on W as well would
  decay W faster than B.

Every other trainable parameter (biases, normalisation layers, unconverted layers) decays at
``weight_decay``.
"""
from __future__ import annotations

from typing import List

from torch import nn

from .convert import Feedback


def param_groups(model: nn.Module, handle: Feedback, weight_decay: float) -> List[dict]:
    """Param groups ``{"params", "weight_decay", "name"}`` for ``model`` converted by ``handle``
    (module docstring): "decayed" (weight decay ``weight_decay``) and, for urfb and kp, "feedback pair"
    (the converted layers' W and B, no optimizer decay). Each trainable parameter of ``model`` is in
    exactly one group; empty groups are left out.
    """
    if not isinstance(handle, Feedback):
        raise TypeError(f"param_groups expects the handle returned by hebbloss.feedback.convert(), got {type(handle).__name__}")
    weight_decay = float(weight_decay)
    if not weight_decay >= 0:
        raise ValueError(f"param_groups: weight_decay must be >= 0, got {weight_decay}")
    in_model = {id(m) for m in model.modules()}
    foreign = [n for n, m in handle.layers.items() if id(m) not in in_model]
    if foreign:
        raise ValueError(f"param_groups: the handle's layers {', '.join(foreign)} are not in this "
                         f"{type(model).__name__}; pass the model that convert() converted")
    pair = set()
    if handle.mode.trainable:
        for m in handle.layers.values():
            pair.add(id(m.weight))
        pair.update(id(p) for p in handle.feedback_parameters())
    decayed, paired = [], []
    for p in model.parameters():
        if p.requires_grad:
            (paired if id(p) in pair else decayed).append(p)
    groups = [{"params": decayed, "weight_decay": weight_decay, "name": "decayed"},
              {"params": paired, "weight_decay": 0.0, "name": "feedback pair"}]
    return [g for g in groups if g["params"]]
