"""Check a model before hebbloss changes it: which layers would be made plastic (or converted to
feedback learning), which cannot be, and why. :func:`hebbloss.attach` and
:func:`hebbloss.feedback.convert` call it first, so its list of reasons is theirs.

    report = hebbloss.validate(model, rule="oja")
    print(report)          # the chosen layers with their family, the refused ones with the reason
    report.ok              # False when a layer is refused, the rule is unknown or nothing matches
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from torch import nn

from . import layers, rules
from .selection import Targets, failure, survey


@dataclass
class ValidationReport:
    """What :func:`validate` found, in model order.

    chosen: (name, family name) of each layer that would be changed; refused: (name, reason) of
    each chosen layer that cannot be; problems: an unknown rule, targets that match nothing, a
    model with no such layer. ``modules`` maps the names in ``chosen`` to the modules.
    """

    model: str
    purpose: str
    chosen: List[Tuple[str, str]] = field(default_factory=list)
    refused: List[Tuple[str, str]] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    modules: Dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """True when nothing is refused and there is no other problem."""
        return not self.refused and not self.problems

    def refuse(self, name: str, reason: str) -> None:
        """Move the chosen layer ``name`` to ``refused`` with ``reason`` (for a caller's own checks)."""
        self.chosen = [(n, f) for n, f in self.chosen if n != name]
        self.modules.pop(name, None)
        self.refused.append((name, reason))

    def message(self) -> Optional[str]:
        """The error message that lists every refused layer and problem (None when ``ok``)."""
        return failure(self.model, self.refused, self.problems, layers.PURPOSES[self.purpose])

    def raise_if_invalid(self) -> "ValidationReport":
        """Raise ValueError with :meth:`message` unless ``ok``; returns the report."""
        message = self.message()
        if message is not None:
            raise ValueError(message)
        return self

    def __str__(self) -> str:
        verb = layers.PURPOSES[self.purpose]
        lines = [f"{self.model}: {len(self.chosen)} layer(s) would be {verb}"]
        lines += [f"  + {n or '(model)'} ({family})" for n, family in self.chosen]
        if self.refused:
            lines.append(f"{len(self.refused)} layer(s) cannot be {verb}:")
            lines += [f"  - {n or '(model)'}: {reason}" for n, reason in self.refused]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def validate(
    model: nn.Module,
    targets: Targets = None,
    rule: Optional[Union[str, rules.Rule]] = None,
    *,
    purpose: str = "plastic",
    strict: bool = False,
) -> ValidationReport:
    """List, before anything changes, every layer of ``model`` that ``targets`` would make plastic
    (``purpose="plastic"``, as :func:`hebbloss.attach`) or convert to feedback learning
    (``purpose="feedback"``, as :func:`hebbloss.feedback.convert`), and every chosen layer that
    cannot be, with the reason. ``rule`` (a name or :class:`hebbloss.rules.Rule`) is checked too.

    targets: as everywhere (:mod:`hebbloss.selection`); None chooses every layer of a registered family.
    strict: raise ValueError listing every refused layer and problem instead of returning them.
    Returns a :class:`ValidationReport`; the model is never changed.
    """
    layers.check_purpose(purpose)
    problems = []
    if rule is not None:
        try:
            rules.get(rule)
        except ValueError as e:
            problems.append(str(e))
    accepted, refused, found = survey(
        model, targets, lambda m: layers.why_unsupported(m, purpose), lambda m: layers.is_candidate(m, purpose),
        layers.PURPOSES[purpose], layers.supported_names(purpose),
    )
    report = ValidationReport(
        model=type(model).__name__, purpose=purpose,
        chosen=[(n, layers.family_of(m).of(m).name) for n, m in accepted],  # accepted: checked above
        refused=refused, problems=problems + found, modules=dict(accepted),
    )
    return report.raise_if_invalid() if strict else report
