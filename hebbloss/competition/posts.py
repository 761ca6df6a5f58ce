"""Post signals by name: ``"relu"``, ``"kwta:4"``, ... resolved to the callable that
:func:`hebbloss.attach` takes as ``post`` (the names ``attach`` and the command line accept).
"""
from __future__ import annotations

from typing import List, Optional, Type

from torch import nn

from .kwta import KWTA
from .softwta import SoftWTA
from .triangle import Triangle

POSTS = ("identity", "none", "relu", "kwta", "softwta", "triangle")
USAGE = ("identity (or none: y = z), relu, kwta[:K[:MU]] (K winners, default 1; homeostasis rate MU, default 0), "
         "softwta[:BETA] (inverse temperature, default 1), triangle[:POWER] (default 1); e.g. 'kwta:4', 'softwta:0.65'")


def _arg(args: List[str], i: int, kind: Type, default, what: str):
    if i >= len(args):
        return default
    try:
        return kind(args[i])
    except ValueError:
        raise ValueError(f"{what} must be {'an integer' if kind is int else 'a number'}, got {args[i]!r}") from None


def post_signal(name: str, channel_dim: int = 1) -> Optional[nn.Module]:
    """The post signal called ``name`` (case-insensitive; see ``USAGE``): None for the identity,
    ``nn.ReLU()``, :class:`KWTA` (Miconi 2021), :class:`SoftWTA` (Journe et al. 2023) or
    :class:`Triangle` (Coates et al. 2011), its channels along ``channel_dim`` (1 for conv outputs,
    -1 for Linear ones). ValueError listing the valid names for anything else."""
    kind, _, rest = str(name).strip().lower().partition(":")
    args = rest.split(":") if rest else []
    try:
        if kind in ("identity", "none") and not args:
            return None
        if kind == "relu" and not args:
            return nn.ReLU()
        if kind == "kwta" and len(args) <= 2:
            return KWTA(k=_arg(args, 0, int, 1, "K"), homeostasis=_arg(args, 1, float, 0.0, "MU"), channel_dim=channel_dim)
        if kind == "softwta" and len(args) <= 1:
            return SoftWTA(inverse_temperature=_arg(args, 0, float, 1.0, "BETA"), channel_dim=channel_dim)
        if kind == "triangle" and len(args) <= 1:
            return Triangle(power=_arg(args, 0, float, 1.0, "POWER"), channel_dim=channel_dim)
    except ValueError as e:
        raise ValueError(f"{name!r}: {e}") from None
    raise ValueError(f"{name!r} is not understood as a post signal; valid names: {USAGE}")
