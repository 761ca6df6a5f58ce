"""Local learning rules as decay terms of one surrogate loss (Miconi 2021).

Every rule here updates a unit c of a layer whose output z is linear in its weight W as

    dW_c = sum_{b,p} y * x_patch  -  S_c * W_c

where y is the post-synaptic signal and S_c = sum_{b,p} s(y, z) is the unit's decay coefficient.
A rule is therefore nothing more than the element-wise density ``s(y, z)`` whose sum over
samples and positions gives S_c (:meth:`Rule.coefficients`, which a rule may override to skip the
density's temporary); :func:`hebbloss.surrogate_loss` does the rest.

Write a new rule in a few lines::

    class Covariance(hebbloss.rules.Rule):
        name = "my_rule"
        def decay(self, post, output):
            return post.abs()
"""
from __future__ import annotations

from typing import Dict, Optional, Type, Union

import torch

_RULES: Dict[str, Type["Rule"]] = {}


class Rule:
    """Base type of a local rule: ``decay(post, output)`` returns s(y, z) (or None for S = 0).

    Subclasses with a ``name`` class attribute become available by that name in
    :func:`get`, ``surrogate_loss(rule=...)`` and ``attach(rule=...)``.
    """

    name: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            _RULES[cls.name] = cls

    def decay(self, post: torch.Tensor, output: torch.Tensor) -> Optional[torch.Tensor]:
        """Element-wise decay density s(y, z), same shape as ``post``; None means S_c = 0."""
        raise NotImplementedError

    def coefficients(self, post: torch.Tensor, output: torch.Tensor, channel_dim: int) -> Optional[torch.Tensor]:
        """S_c: the density summed over every dimension but ``channel_dim`` (None when S = 0).
        Override it to compute S_c without materialising the density, as :class:`Oja` does."""
        density = self.decay(post, output)
        if density is None or output.dim() == 1:
            return density
        channel_dim %= output.dim()
        return density.sum(dim=[d for d in range(output.dim()) if d != channel_dim])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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
        it; a norm over batch and positions together is much less accurate). Half-precision signals are
        reduced in float32. With one position per sample the plain sum is the faster."""
        if post.dim() < 3 or channel_dim % post.dim() != 1 or not post.is_contiguous() \
                or post.numel() == post.shape[0] * post.shape[1]:
            return super().coefficients(post, output, channel_dim)
        dtype = torch.promote_types(post.dtype, torch.float32)
        return torch.linalg.vector_norm(post.flatten(2), dim=2, dtype=dtype).square_().sum(dim=0)


class SoftHebb(Rule):
    """SoftHebb (Journe et al. 2023): dW = y (x - u W) with u the layer's output, S_c = sum y*u."""

    name = "softhebb"

    def decay(self, post, output):
        return post * output


def available() -> list:
    """Names of the registered rules, sorted."""
    return sorted(_RULES)


def get(rule: Union[str, Rule]) -> Rule:
    """Return a rule object from a name or a rule object; a clear error lists the valid names."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, type) and issubclass(rule, Rule):
        return rule()
    if isinstance(rule, str) and rule.lower() in _RULES:
        return _RULES[rule.lower()]()
    raise ValueError(
        f"unknown rule {rule!r}; valid rules are {', '.join(available())}, "
        "or pass an instance of a hebbloss.rules.Rule subclass"
    )
