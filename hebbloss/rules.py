"""Local learning rules as decay terms of one surrogate loss (Miconi 2021).

Every rule here updates a unit c of a layer whose output z is linear in its weight W as

    dW_c = sum_{b,p} y * x_patch  -  S_c * W_c

where y is the post-synaptic signal and S_c = sum_{b,p} s(y, z) is the unit's decay coefficient.
A rule is therefore nothing more than the element-wise density ``s(y, z)`` whose sum over
samples and positions gives S_c (:meth:`Rule.coefficients`, which a rule may override to skip the
density's temporary); :func:`hebbloss.surrogate_loss` does the rest.

Write a new rule in a few lines; here S_c = sum |y|::

    class AbsDecay(hebbloss.rules.Rule):
        name = "abs_decay"
        def decay(self, post, output):
            return post.abs()

after which ``attach(model, rule="abs_decay")`` uses it. The registry of names:

- a class is registered under the ``name`` written in its own class body; a subclass that only
  inherits a name (``class MyOja(Oja): pass``) registers nothing, so ``"oja"`` keeps meaning
  :class:`Oja` (pass ``rule=MyOja()`` or give the subclass a name of its own);
- names are case-insensitive: they are stored in lower case, and :func:`get` and :func:`available`
  agree on them;
- a name already taken by another class is refused with an error, unless the class says
  ``override=True``: ``class MyOja(Oja, override=True): name = "oja"``. Defining a class again under
  the same module and qualified name (a re-run notebook cell, a reloaded module) replaces the old one;
- a registered rule must define ``decay`` or ``coefficients``; one that defines neither is refused
  when its class is defined, an unnamed one when :func:`get` (hence ``attach``) first sees it;
- :func:`register` and :func:`unregister` do the same by hand (``register`` is what a class
  definition calls); a refused registration leaves the registry as it was.

The registry follows the pattern of timm's model registry (``timm/models/_registry.py``), which
warns and overwrites on a clash; here a clash is an error unless asked for.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Type, Union

import torch

_RULES: Dict[str, Type["Rule"]] = {}
_NAME = re.compile(r"[a-z_][a-z0-9_\-]*")


class Rule:
    """Base type of a local rule: ``decay(post, output)`` returns s(y, z) (or None for S = 0).

    A subclass that defines a ``name`` in its own class body becomes available by that name (in
    lower case) in :func:`get`, ``surrogate_loss(rule=...)`` and ``attach(rule=...)``; a name that is
    taken raises unless the class is defined with ``override=True`` (see the module docstring).
    """

    name: str = ""

    def __init_subclass__(cls, override: bool = False, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            register(cls, override=override)
        elif override:
            raise TypeError(
                f"rule class {cls.__qualname__} was given override=True but defines no name of its own; "
                "write name = \"...\" in its class body (the name it replaces)"
            )

    def decay(self, post: torch.Tensor, output: torch.Tensor) -> Optional[torch.Tensor]:
        """Element-wise decay density s(y, z), same shape as ``post``; None means S_c = 0."""
        raise NotImplementedError(_missing_decay(type(self)))

    def coefficients(self, post: torch.Tensor, output: torch.Tensor, channel_dim: int) -> Optional[torch.Tensor]:
        """S_c: the density summed over every dimension but ``channel_dim`` (None when S = 0).
        Override it to compute S_c without materialising the density, as :class:`Oja` does."""
        density = self.decay(post, output)
        if density is None or output.dim() == 1:
            return density
        channel_dim %= output.dim()
        return density.sum(dim=[d for d in range(output.dim()) if d != channel_dim])

    def decay_is_correlation(self) -> bool:
        """Whether S_c is the unit's own correlation sum y*z (then it can be read off the weight-gradient
        product sum y x, as <W_c, sum y x_c> + b_c sum y_c, without reading y and z again). False here."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _missing_decay(cls: type) -> str:
    return (
        f"rule class {cls.__qualname__} defines neither decay nor coefficients: implement "
        "decay(self, post, output) returning the decay density s(y, z) with post's shape (or None "
        "for no decay), or override coefficients(self, post, output, channel_dim) returning S_c"
    )


def _implemented(cls: type) -> bool:
    return cls.decay is not Rule.decay or cls.coefficients is not Rule.coefficients


def register(cls: Type[Rule], *, override: bool = False) -> Type[Rule]:
    """Make rule class ``cls`` available under the name in its own class body, in lower case.

    A name held by another class raises ValueError unless ``override=True``; a class defined again
    under the same module and qualified name replaces its old self. Nothing is registered when
    an error is raised. Returns ``cls``. A class definition calls this itself (see the module docstring).
    """
    if not (isinstance(cls, type) and issubclass(cls, Rule)) or cls is Rule:
        raise TypeError(f"register takes a subclass of hebbloss.rules.Rule, got {cls!r}")
    name = cls.__dict__.get("name")
    if not name:
        inherited = f" (it inherits {cls.name!r})" if cls.name else ""
        raise ValueError(
            f"rule class {cls.__qualname__} defines no name of its own{inherited}; write name = \"...\" in its class body"
        )
    if not isinstance(name, str) or not _NAME.fullmatch(name.lower()):
        raise ValueError(
            f"rule class {cls.__qualname__} has name {name!r}; a rule name is a letter or underscore "
            "followed by letters, digits, '_' or '-'"
        )
    if not _implemented(cls):
        raise TypeError(_missing_decay(cls))
    key = name.lower()
    old = _RULES.get(key)
    same_class = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
    if old is not None and not same_class and not override:
        raise ValueError(
            f"rule name {key!r} is already taken by {old.__module__}.{old.__qualname__}; "
            f"{cls.__module__}.{cls.__qualname__} cannot take it too: pick another name, or define it as "
            f"class {cls.__name__}(..., override=True) to replace that rule"
        )
    _RULES[key] = cls
    return cls


def unregister(name: str) -> Type[Rule]:
    """Remove the rule registered under ``name`` (any case) and return its class."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _RULES:
        raise KeyError(f"no rule is registered as {name!r}; registered rules are {', '.join(available())}")
    return _RULES.pop(key)


class Hebb(Rule):
    """Plain Hebb (Hebb 1949): dW = y x, no decay (S_c = 0)."""

    name = "hebb"

    def decay(self, post, output):
        return None


class Instar(Rule):
    """Instar (Grossberg 1976): dW = y (x - W), i.e. S_c = sum y."""

    name = "instar"

    def decay(self, post, output):
        return post


class Oja(Rule):
    """Oja's rule (Oja 1982): dW = y (x - y W), i.e. S_c = sum y^2."""

    name = "oja"

    def decay(self, post, output):
        return post * post

    def coefficients(self, post, output, channel_dim):
        """sum y^2 per unit. For a contiguous [batch, unit, *positions] signal (every convolution) it is the
        squared norm of each sample's positions, summed over the batch: no activation-sized y*y
        temporary, and a float32 error no larger than the plain sum's (tests/test_core_rules.py checks
        it; a norm over batch and positions together is much less accurate). Any other layout (a
        channels-last convolution, units last) sums y*y over batch chunks (:func:`summed_density`).
        Half-precision signals are reduced in float32."""
        if post.dim() < 3 or channel_dim % post.dim() != 1 or not post.is_contiguous() \
                or post.numel() == post.shape[0] * post.shape[1]:
            # Oja's own density reads y alone: passing y as the output converts half precision once
            return summed_density(self.decay, post, post if type(self).decay is Oja.decay else output, channel_dim)
        dtype = torch.promote_types(post.dtype, torch.float32)
        return torch.linalg.vector_norm(post.flatten(2), dim=2, dtype=dtype).square_().sum(dim=0)


class SoftHebb(Rule):
    """SoftHebb (Journe et al. 2023): dW = y (x - u W) with u the layer's output, S_c = sum y*u."""

    name = "softhebb"

    def decay(self, post, output):
        return post * output

    def coefficients(self, post, output, channel_dim):
        """sum y*u per unit, over batch chunks (:func:`summed_density`). Where the layer's Hebbian
        product is taken at once, hebbloss reads S_c off that product instead (:meth:`decay_is_correlation`)."""
        return summed_density(self.decay, post, output, channel_dim)

    def decay_is_correlation(self) -> bool:
        """True, unless a subclass changed how S_c is computed."""
        return type(self).decay is SoftHebb.decay and type(self).coefficients is SoftHebb.coefficients


DENSITY_CHUNK_BYTES = 2 ** 20  # of y per chunk in summed_density (Xeon, 1 thread: 256 KiB to 1 MiB alike)


def summed_density(decay, post: torch.Tensor, output: torch.Tensor, channel_dim: int) -> Optional[torch.Tensor]:
    """S_c: the element-wise density ``decay(post, output)`` summed over every dimension but
    ``channel_dim``, taken over chunks of the leading dimension of at most :data:`DENSITY_CHUNK_BYTES`
    of ``post`` each (where that dimension is not the units'): each chunk's density temporary stays
    in the cache and under the allocator's threshold for fresh pages, where a whole activation-sized
    one does not (timm convnext_atto, batch 32, channels-last [32, 160, 56, 56]: 8 ms against 31 ms
    for y*y and its sum). Equal to the plain sum up to float rounding; a half-precision signal is taken
    to float32 a chunk at a time, before its density. Only for a density that is element-wise, as the
    built-in rules' are."""
    half = post.dtype in (torch.float16, torch.bfloat16)
    if output.dim() == 1:  # an unbatched Linear: y's units are the only dimension
        return decay(post.float(), output.float()) if half else decay(post, output)
    channel_dim %= output.dim()
    dims = [d for d in range(output.dim()) if d != channel_dim]
    per_row = post[0].numel() * post.element_size() if post.shape[0] else 0
    step = post.shape[0] if channel_dim == 0 or not per_row else max(1, DENSITY_CHUNK_BYTES // per_row)
    total = None
    for y, u in zip(post.split(step), output.split(step)):
        if half:
            y, u = (y.float(), u.float()) if output is not post else (y.float(),) * 2
        density = decay(y, u)
        if density is None:
            return None
        part = density.sum(dim=dims)
        total = part if total is None else total.add_(part)
    return total


def available() -> list:
    """Names of the registered rules, sorted."""
    return sorted(_RULES)


def get(rule: Union[str, Rule]) -> Rule:
    """Return a rule object from a name (any case), a rule class or a rule object; a clear error
    lists the valid names, or says what a rule class that defines neither decay nor coefficients lacks."""
    cls = type(rule) if isinstance(rule, Rule) else rule
    if isinstance(cls, type) and issubclass(cls, Rule):
        if not _implemented(cls):
            raise TypeError(_missing_decay(cls))
        return rule if isinstance(rule, Rule) else cls()
    if isinstance(rule, str) and rule.lower() in _RULES:
        return _RULES[rule.lower()]()
    raise ValueError(
        f"unknown rule {rule!r}; valid rules are {', '.join(available())}, "
        "or pass an instance of a hebbloss.rules.Rule subclass"
    )
