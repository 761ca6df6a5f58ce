"""hebbloss: local learning rules as losses for any PyTorch model (Miconi 2021).

The core, imported with the package: :func:`surrogate_loss` (one layer), :func:`attach` (any model)
and its :class:`Plasticity` handle, :mod:`rules` (:class:`Rule`), :mod:`layers` (the layer families),
:func:`select_layers`, :func:`validate` and :mod:`competition` (KWTA, SoftWTA, Triangle, post signals).
Around it, submodules imported on first use (so ``import hebbloss`` pulls in neither timm, nor
torchvision, nor matplotlib): :mod:`optim` (optimizer extras), :mod:`init`, :mod:`prune`, :mod:`zca`,
:mod:`models` (the papers' networks), :mod:`data`, :mod:`probe` (layerwise linear probes),
:mod:`feedback` (no weight symmetry), :mod:`checkpoint`, :mod:`atomic`. ``hebbloss.softhebb`` is the
old home of SoftHebb's optimizer extras, kept as an alias of names now in :mod:`optim` and :mod:`init`.
"""
import importlib as _importlib

from . import competition, layers, rules
from .attach import Plasticity, attach
from .competition import KWTA, SoftWTA, Triangle, post_signal
from .layers import UnsupportedLayer
from .rules import Rule
from .selection import select_layers
from .surrogate import surrogate_loss
from .validation import ValidationReport, validate

_SUBMODULES = ("atomic", "checkpoint", "data", "feedback", "init", "models", "optim", "probe", "prune", "softhebb", "zca")
_FROM_SUBMODULES = {"ZCA": "zca"}

__all__ = [
    "KWTA", "Plasticity", "Rule", "SoftWTA", "Triangle", "UnsupportedLayer", "ValidationReport", "ZCA", "attach",
    "competition", "layers", "post_signal", "rules", "select_layers", "surrogate_loss", "validate",
    *_SUBMODULES,
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import a submodule (or a name from one) on first use (PEP 562)."""
    if name in _SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    if name in _FROM_SUBMODULES:
        return getattr(_importlib.import_module(f".{_FROM_SUBMODULES[name]}", __name__), name)
    raise AttributeError(f"module 'hebbloss' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
