"""hebbloss: local learning rules as losses for any PyTorch model (Miconi 2021)."""
from . import layers, rules
from .attach import Plasticity, attach
from .selection import select_layers
from .surrogate import surrogate_loss

__all__ = ["Plasticity", "attach", "layers", "rules", "select_layers", "surrogate_loss"]
__version__ = "0.1.0"
