"""One rule for choosing layers of a model, used by every hebbloss function that takes ``targets``.

``targets`` is None (every supported layer), or one item or a list of items, each of which is
- a string: matches a module whose qualified name equals it, ends with "." + it, matches it as a
  shell glob (``layer*.conv?``) or fully matches it as a regular expression (``features\\.\\d+``);
- a type: matches instances of it (and of its subclasses);
- a callable ``predicate(name, module) -> bool``.
A module is selected when any item matches it. All checks run before anything is changed.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Callable, List, Optional, Sequence, Tuple, Union

from torch import nn

from . import layers

Target = Union[str, type, Callable[[str, nn.Module], bool]]
Targets = Optional[Union[Target, Sequence[Target]]]


def name_matches(pattern: str, name: str) -> bool:
    """True when ``pattern`` selects the module called ``name`` (exact, suffix, glob or regex)."""
    if name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _as_list(targets: Targets) -> List[Target]:
    if isinstance(targets, (str, type)) or callable(targets):
        return [targets]
    return list(targets)


def _matches(target: Target, name: str, module: nn.Module) -> bool:
    if isinstance(target, str):
        return name_matches(target, name)
    if isinstance(target, type):
        return isinstance(module, target)
    if callable(target):
        return bool(target(name, module))
    raise TypeError(f"a target must be a string, a type or a callable(name, module), got {target!r}")


BYPASSED = ("its parent nn.MultiheadAttention uses this layer's weight in its own functional forward, so the "
            "layer's forward, and any hook on it, never runs")


def _bypassed_modules(model: nn.Module) -> set:
    """ids of layers whose parent computes with their weight without calling them (nn.MultiheadAttention.out_proj)."""
    return {id(child) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for child in m.children()}


def select_layers(
    model: nn.Module,
    targets: Targets = None,
    supported: Callable[[nn.Module], Optional[str]] = layers._reason_unsupported,
    purpose: str = "made plastic",
) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` chosen by ``targets``, in model order.

    With ``targets=None`` every supported layer is chosen. Raises ValueError, before anything
    is changed, when nothing matches (listing what the model has) or when a chosen layer, or a
    subclass of a supported type that overrides its forward, is unsupported (listing each with its reason).
    """
    named = list(model.named_modules())
    if targets is None:
        chosen = [(n, m) for n, m in named if layers.has_registered_base(m)]
    else:
        items = _as_list(targets)
        chosen = [(n, m) for n, m in named if any(_matches(t, n, m) for t in items)]
        if not chosen:
            have = [f"{n or '(model)'} ({type(m).__name__})" for n, m in named if layers.has_registered_base(m)]
            raise ValueError(
                f"targets={targets!r} matched no module of {type(model).__name__}; its layers that can be "
                f"{purpose} are: {', '.join(have) or 'none'}. A string matches a qualified name exactly, "
                "as a suffix after '.', as a glob or as a regular expression."
            )
    bypassed = _bypassed_modules(model)
    refused = [(n, BYPASSED if id(m) in bypassed else supported(m)) for n, m in chosen]
    refused = [(n, r) for n, r in refused if r is not None]
    if refused:
        lines = "\n".join(f"  - {n or '(model)'}: {r}" for n, r in refused)
        raise ValueError(
            f"these layers of {type(model).__name__} cannot be {purpose}:\n{lines}\n"
            "Leave them out with targets=... (a list of names, globs, regexes, types or a predicate)."
        )
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no layer that can be {purpose} (supported: Linear, Conv*d, ConvTranspose*d)")
    return chosen
