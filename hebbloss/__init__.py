"""hebbloss: local learning rules as losses for any PyTorch model (Miconi 2021).

The core: :func:`surrogate_loss` (one layer), :func:`attach` (any model), :mod:`rules`.
Around it, as submodules: :mod:`competition` (KWTA, SoftWTA, Triangle), :mod:`prune`, :mod:`zca`,
:mod:`softhebb` (the paper's optimizer extras), :mod:`models` (the papers' networks),
:mod:`data`, :mod:`probe` (layerwise linear probes), :mod:`feedback` (no weight symmetry).
"""
from . import competition, data, feedback, layers, models, probe, prune, rules, softhebb, zca
from .attach import Plasticity, attach
from .competition import KWTA, SoftWTA, Triangle
from .selection import select_layers
from .surrogate import surrogate_loss
from .validate import validate
from .zca import ZCA

__all__ = [
    "KWTA", "Plasticity", "SoftWTA", "Triangle", "ZCA", "attach", "competition", "data", "feedback",
    "layers", "models", "probe", "prune", "rules", "select_layers", "softhebb", "surrogate_loss", "validate", "zca",
]
__version__ = "0.1.0"
