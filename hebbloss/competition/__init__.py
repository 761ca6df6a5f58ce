"""Competition between the units of a layer: the post-synaptic signals of ``hebbloss.attach``
(k-WTA with homeostasis from Miconi 2021, soft-WTA from SoftHebb, Journe et al. 2023, identity,
ReLU) and the Triangle forward nonlinearity (Coates et al. 2011); :func:`post_signal` gives them by name.

The signal that drives a layer's forward pass (a Triangle in the model) and the one that drives
its plasticity (the ``post`` given to ``attach``) are chosen independently: dense activations,
sparse plasticity (Miconi 2021).
"""
from torch.nn import Identity, ReLU

from .kwta import KWTA, kwta_mask
from .posts import POSTS, post_signal
from .softwta import SoftWTA, soft_wta
from .triangle import Triangle, triangle

__all__ = ["KWTA", "SoftWTA", "Triangle", "Identity", "ReLU", "kwta_mask", "soft_wta", "triangle", "post_signal", "POSTS"]
