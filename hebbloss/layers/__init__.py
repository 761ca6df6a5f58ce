"""Layer families: what hebbloss knows about each kind of layer, each family declared in one file.

A family (a :class:`LayerType`) says how a layer's output is linear in its weight (where its units
are, the weight as [units, fan_in] rows: what the surrogate term needs), the adjoint that the
feedback modes use for its backward, and why a variant of it is unsupported. Families are
registered with :func:`register` (``linear.py``, ``conv.py``, ``timm_layers.py``,
``locally_connected.py``) and found through a module's class hierarchy; a subclass that overrides
``forward`` (timm's ``StdConv2d``) is never silently treated as its parent: it must be registered
itself, or it is refused with the reason. Pruning by ``torch.nn.utils.prune`` is understood for
every family (:func:`is_pruned`, :func:`plastic_weight`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Protocol, Tuple, Union

import torch
from torch import nn

# What a layer may be chosen for, and the words the errors use for it.
PURPOSES = {"plastic": "made plastic", "feedback": "converted to feedback learning"}


class Adjoint(Protocol):
    """The two halves of a layer's backward pass for an error delta = dL/dz (see :meth:`LayerType.adjoint`)."""

    def input_grad(self, delta: torch.Tensor, x: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
        """The input gradient with ``feedback`` (B) in place of the weight, in the dtype of ``x``."""

    def weight_grad(self, delta: torch.Tensor, x: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
        """delta * x^T, shaped and typed as ``feedback``."""

    # Optional attribute ``sparse_weight_grad(delta, x, feedback)``: the same product from delta's nonzeros
    # (:mod:`hebbloss.layers.sparse`); absent or None where the family has none (the dense one serves).
    # Optional method ``weight_grad_is_faster(delta, feedback) -> bool``: whether ``weight_grad`` is faster
    # for this call than the kernel the layer's own backward runs (hebbloss then takes the product with it).


class LayerType:
    """A family of layers whose output is linear in their weight: z = W * x + b.

    name: what reports call it. spatial_dims: number of dimensions after the units in the output
    (0 for Linear, whose units are the last dimension). transposed: weight stored as
    [in, out/groups, ...] (transposed convolutions). cannot_be_plastic: None, or why the surrogate
    term does not apply to this family (it can then only be trained by
    :func:`hebbloss.feedback.convert`; :func:`hebbloss.attach` skips it unless named in ``targets``).

    A family that varies per layer (convolutions of 1, 2 or 3 dimensions) overrides :meth:`of`; one
    that supports the feedback modes overrides :meth:`adjoint`; one with unsupported variants
    overrides :meth:`why_unsupported`.
    """

    name: str = "layer"
    spatial_dims: int = 0
    transposed: bool = False
    cannot_be_plastic: Optional[str] = None

    def __init__(self, name: Optional[str] = None, spatial_dims: Optional[int] = None,
                 transposed: Optional[bool] = None):
        if name is not None:
            self.name = name
        if spatial_dims is not None:
            self.spatial_dims = spatial_dims
        if transposed is not None:
            self.transposed = transposed

    def __repr__(self) -> str:
        cls = type(self)
        args = [f"{k}={getattr(self, k)!r}" for k in ("name", "spatial_dims", "transposed")
                if k in vars(self) and getattr(self, k) != getattr(cls, k)]
        return f"{cls.__module__}.{cls.__qualname__}({', '.join(args)})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self), self._key()))

    def _key(self):
        return self.name, self.spatial_dims, self.transposed

    # ---- what a module of the family is
    def of(self, module: nn.Module) -> "LayerType":
        """The layer type of this particular ``module`` (a convolution family picks its dimension)."""
        return self

    def why_unsupported(self, module: nn.Module, purpose: str) -> Optional[str]:
        """Why this variant of the family cannot serve ``purpose`` ("plastic" or "feedback"), or None."""
        return None

    def adjoint(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> Optional[Adjoint]:
        """The backward halves of ``module``'s call on ``x`` that gave ``output``, for the feedback
        modes (:mod:`hebbloss.feedback`); None for a family that declares none."""
        return None

    # ---- how the output is linear in the weight (the surrogate term)
    def channel_dim(self, output: torch.Tensor) -> int:
        """Dimension of ``output`` that indexes the output units."""
        return output.dim() - 1 - self.spatial_dims

    @property
    def post_channel_dim(self) -> int:
        """The units' dimension of a batched output, as post signals take it: -1 when last, else 1."""
        return -1 if self.spatial_dims == 0 else 1

    def unit_weights(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The weight as a [units, fan_in] view (a copy only for transposed layers)."""
        if not self.transposed:
            return weight.reshape(weight.shape[0], -1)
        in_ch, out_per_group = weight.shape[0], weight.shape[1]
        w = weight.reshape(groups, in_ch // groups, out_per_group, -1)
        return w.transpose(1, 2).reshape(groups * out_per_group, -1)

    def per_unit(self, values: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """A [units] vector broadcastable against ``weight`` (expanded across groups when transposed)."""
        if not self.transposed:
            return values.view(-1, *([1] * (weight.dim() - 1)))
        in_ch, out_per_group = weight.shape[0], weight.shape[1]
        v = values.view(groups, 1, out_per_group, *([1] * (weight.dim() - 2)))
        return v.expand(groups, in_ch // groups, out_per_group, *([1] * (weight.dim() - 2))).reshape(
            in_ch, out_per_group, *([1] * (weight.dim() - 2)))

    def num_units(self, weight: torch.Tensor, groups: int = 1) -> int:
        """The number of output units of a weight of this family."""
        return weight.shape[1] * groups if self.transposed else weight.shape[0]


# Families by module class, or by "module.QualName" for classes of packages hebbloss does not import
# (timm): those are matched by name through the class hierarchy, so registering them imports nothing.
_FAMILIES: Dict[Union[type, str], LayerType] = {}
# Methods whose override by a subclass means "computes its output differently".
_FORWARD_METHODS = ("forward", "_conv_forward")


class UnsupportedLayer(TypeError):
    """A module that hebbloss cannot make plastic (or convert), with the reason."""


def register(*classes: Union[type, str], layer_type: Optional[LayerType] = None):
    """Declare the family of ``classes``: module classes, or "package.module.ClassName" strings for
    classes of packages hebbloss must not import (matched by name, e.g. timm's).

    As a decorator on a :class:`LayerType` subclass, it registers an instance of it::

        @hebbloss.layers.register(MyLayer)
        class MyFamily(hebbloss.layers.LayerType):
            name, spatial_dims = "my_layer", 0

    As a call, ``register(MyConv, layer_type=hebbloss.layers.conv.CONV[2])`` declares that
    ``MyConv`` computes its output as that family does. Subclasses of a registered class inherit its
    family unless they override ``forward``.
    """
    for cls in classes:
        if not (isinstance(cls, type) or (isinstance(cls, str) and "." in cls)):
            raise TypeError(f"register() takes module classes or 'package.module.ClassName' strings, got {cls!r}")

    def add(family):
        instance = family() if isinstance(family, type) else family
        if not isinstance(instance, LayerType):
            raise TypeError(f"register() declares a hebbloss.layers.LayerType (or a subclass of it), got {family!r}")
        for cls in classes:
            _FAMILIES[cls] = instance
        return family

    return add if layer_type is None else add(layer_type)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _registered_base(cls: type) -> Optional[Tuple[type, LayerType]]:
    """The first class of ``cls``'s hierarchy with a family, and that family."""
    for base in cls.__mro__:
        family = _FAMILIES.get(base) or _FAMILIES.get(_qualified(base))
        if family is not None:
            return base, family
    return None


def _serves(family: LayerType, purpose: str) -> bool:
    if purpose == "plastic":
        return family.cannot_be_plastic is None
    return type(family).adjoint is not LayerType.adjoint


def supported_names(purpose: str = "plastic") -> List[str]:
    """The class names of the registered layers that can serve ``purpose``, in registration order."""
    names = [k.__name__ if isinstance(k, type) else k.rpartition(".")[2] for k, f in _FAMILIES.items() if _serves(f, purpose)]
    return list(dict.fromkeys(names))


def family_of(module: nn.Module) -> Optional[LayerType]:
    """The family registered for ``module``'s class or its nearest registered base (no checks), or None."""
    found = _registered_base(type(module))
    return None if found is None else found[1]


def check_purpose(purpose: str) -> None:
    """Refuse a ``purpose`` other than those of :data:`PURPOSES`."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(map(repr, PURPOSES))}, got {purpose!r}")


def why_unsupported(module: nn.Module, purpose: str = "plastic") -> Optional[str]:
    """Why ``module`` cannot be made plastic (``purpose="plastic"``) or converted to feedback
    learning (``purpose="feedback"``), or None when it can."""
    check_purpose(purpose)
    cls = type(module)
    found = _registered_base(cls)
    if found is None:
        return f"{cls.__name__} is not a registered layer type (supported: {', '.join(supported_names(purpose))})"
    base, family = found
    for method in _FORWARD_METHODS:
        if getattr(cls, method, None) is not getattr(base, method, None):
            return (
                f"{cls.__name__} overrides {method}() of {base.__name__}, so its output need not be linear in its "
                f"weight (timm's StdConv2d standardises the weight there); if its output is still W*x + b, "
                f"register it: hebbloss.layers.register({cls.__name__}, layer_type={family!r})"
            )
    if torch.nn.utils.parametrize.is_parametrized(module):
        return f"{cls.__name__} has a parametrized weight (e.g. weight norm), so its output is not linear in the stored weight"
    if hasattr(module, "weight_g") or hasattr(module, "weight_v"):
        how = "spectral_norm" if hasattr(module, "weight_u") else "weight_norm"
        return f"{cls.__name__} uses {how}, which derives its weight in forward, so its output is not linear in the stored weight"
    if not isinstance(getattr(module, "weight", None), nn.Parameter) and not is_pruned(module):
        return f"{cls.__name__} has no weight Parameter (lazy or derived weight)"
    if purpose == "plastic" and family.cannot_be_plastic is not None:
        return f"{cls.__name__} cannot be made plastic: {family.cannot_be_plastic}"
    if purpose == "feedback" and not _serves(family, purpose):
        return (f"{cls.__name__} cannot be converted to feedback learning: its layer family declares no adjoint "
                f"(supported: {', '.join(supported_names(purpose))})")
    return family.why_unsupported(module, purpose)


def is_pruned(module: nn.Module) -> bool:
    """True when torch.nn.utils.prune computes ``weight = weight_orig * weight_mask``."""
    return isinstance(getattr(module, "weight_orig", None), nn.Parameter) and hasattr(module, "weight_mask")


def layer_type_of(module: nn.Module, purpose: str = "plastic") -> LayerType:
    """The :class:`LayerType` of ``module``; raises :class:`UnsupportedLayer` with the reason."""
    reason = why_unsupported(module, purpose)
    if reason is not None:
        raise UnsupportedLayer(reason)
    return family_of(module).of(module)


def is_supported(module: nn.Module, purpose: str = "plastic") -> bool:
    """True when ``module`` can be made plastic (or converted, with ``purpose="feedback"``)."""
    return why_unsupported(module, purpose) is None


def has_registered_base(module: nn.Module) -> bool:
    """True when some class in ``module``'s hierarchy is registered (supported or refused)."""
    return family_of(module) is not None


def is_candidate(module: nn.Module, purpose: str = "plastic") -> bool:
    """True when ``targets=None`` chooses ``module`` for ``purpose``: it has a registered family, unless
    that family cannot be made plastic at all (then attach skips it). A chosen module may still be refused."""
    family = family_of(module)
    return family is not None and (purpose != "plastic" or family.cannot_be_plastic is None)


def groups_of(module: nn.Module) -> int:
    return getattr(module, "groups", 1)


def plastic_weight(module: nn.Module) -> nn.Parameter:
    """The weight Parameter a rule updates: ``weight_orig`` when pruned, else ``weight``."""
    return module.weight_orig if is_pruned(module) else module.weight


def plastic_parameters(module: nn.Module) -> Tuple[nn.Parameter, ...]:
    """The parameters a rule updates: :func:`plastic_weight` and the bias."""
    weight = plastic_weight(module)
    return (weight,) if module.bias is None else (weight, module.bias)


from . import linear, conv, timm_layers, locally_connected  # noqa: E402,F401  (registration side effects)
