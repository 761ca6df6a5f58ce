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


def survey(
    model: nn.Module,
    targets: Targets,
    supported: Callable[[nn.Module], Optional[str]],
    candidate: Callable[[nn.Module], bool],
    purpose: str,
    supported_names: Sequence[str],
) -> Tuple[List[Tuple[str, nn.Module]], List[Tuple[str, str]], List[str]]:
    """Apply ``targets`` to ``model`` without raising: (accepted (name, module) pairs in model order,
    refused (name, reason) pairs, other problems). ``targets=None`` chooses every ``candidate``;
    each chosen layer is then checked with ``supported`` (a reason or None). A target of a wrong
    kind raises TypeError at once."""
    named = list(model.named_modules())
    if targets is None:
        chosen = [(n, m) for n, m in named if candidate(m)]
    else:
        items = _as_list(targets)
        chosen = [(n, m) for n, m in named if any(_matches(t, n, m) for t in items)]
        if not chosen:
            have = [f"{n or '(model)'} ({type(m).__name__})" for n, m in named if candidate(m)]
            return [], [], [
                f"targets={targets!r} matched no module of {type(model).__name__}; its layers that can be "
                f"{purpose} are: {', '.join(have) or 'none'}. A string matches a qualified name exactly, "
                "as a suffix after '.', as a glob or as a regular expression."
            ]
    if not chosen:
        return [], [], [f"{type(model).__name__} has no layer that can be {purpose} (supported: {', '.join(supported_names)})"]
    bypassed = _bypassed_modules(model)
    reasons = {n: BYPASSED if id(m) in bypassed else supported(m) for n, m in chosen}
    refused = [(n, r) for n, r in reasons.items() if r is not None]
    return [(n, m) for n, m in chosen if reasons[n] is None], refused, []


def failure(model_name: str, refused: Sequence[Tuple[str, str]], problems: Sequence[str], purpose: str) -> Optional[str]:
    """The error message for ``refused`` layers and other ``problems`` (None when there are none)."""
    parts = list(problems)
    if refused:
        lines = "\n".join(f"  - {n or '(model)'}: {r}" for n, r in refused)
        parts.append(
            f"these layers of {model_name} cannot be {purpose}:\n{lines}\n"
            "Leave them out with targets=... (a list of names, globs, regexes, types or a predicate)."
        )
    return "\n".join(parts) or None


def select_layers(
    model: nn.Module,
    targets: Targets = None,
    supported: Callable[[nn.Module], Optional[str]] = layers.why_unsupported,
    purpose: str = "made plastic",
) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` chosen by ``targets``, in model order.

    With ``targets=None`` every layer of a registered family is chosen. Raises ValueError, before
    anything is changed, when nothing matches (listing what the model has) or when a chosen layer, or
    a subclass of a supported type that overrides its forward, is unsupported (listing each with its
    reason). :func:`hebbloss.validate` reports the same without raising.
    """
    chosen, refused, problems = survey(model, targets, supported, layers.has_registered_base, purpose,
                                       layers.supported_names())
    message = failure(type(model).__name__, refused, problems, purpose)
    if message is not None:
        raise ValueError(message)
    return chosen
