"""Reference networks, plain ``nn.Module``s trained through ``hebbloss.attach`` like any model,
each carrying its recipe as data (``model.recipe``) and the names of its plastic and probed
layers (``model.plastic_layers``, ``model.feature_layers``).

    model = hebbloss.models.create("softhebb", dataset="cifar10")
    plastic = model.recipe.attach(model)
    optimizer = model.recipe.optimizer(plastic)   # then train as in hebbloss.models.recipe

- ``amit2019``: Amit 2019, Front. Comput. Neurosci. (trained with :mod:`hebbloss.feedback`).
- ``miconi2021``: Miconi 2021, arXiv:2107.01729.
- ``softhebb``: Journe et al. 2023, "Hebbian deep learning without feedback", ICLR.
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from .amit2019 import Amit2019Net, amit2019
from .miconi2021 import HomeostaticTriangle, Miconi2021, miconi2021
from .recipe import LayerRecipe, Recipe
from .softhebb import SoftHebbNet, softhebb

_MODELS: Dict[str, Callable[..., nn.Module]] = {"amit2019": amit2019, "miconi2021": miconi2021, "softhebb": softhebb}
_LOCAL_RULE = ("miconi2021", "softhebb")  # trained by a local rule: they carry a Hebbian ``model.recipe``


def available() -> list:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_MODELS)


def with_recipe() -> list:
    """Names of the networks trained by a local rule, which carry a Hebbian ``model.recipe`` (the
    ``hebbloss`` command trains these; ``amit2019`` trains through :mod:`hebbloss.feedback`)."""
    return sorted(_LOCAL_RULE)


def create(name: str, **kwargs) -> nn.Module:
    """Build the reference network ``name`` (keyword arguments go to its builder, e.g.
    ``create("softhebb", dataset="stl10")`` or ``create("miconi2021", pruning=False)``)."""
    key = str(name).lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _MODELS[key](**kwargs)


__all__ = ["Amit2019Net", "HomeostaticTriangle", "LayerRecipe", "Miconi2021", "Recipe", "SoftHebbNet", "amit2019", "available", "create", "miconi2021", "softhebb", "with_recipe"]
