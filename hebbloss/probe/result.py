"""The outcome of one linear probe."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class ProbeResult:
    """Train and test accuracy (fractions in [0, 1]) of one linear readout; alpha: the ridge penalty used."""

    train_acc: float
    test_acc: float
    alpha: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)
