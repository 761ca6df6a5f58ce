"""Probe a model and its baselines layer by layer in one harness."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from .result import ProbeResult


@dataclass
class ProbeReport:
    """results[model_name][layer_name] -> ProbeResult; model_name is "model" or a baseline name."""

    results: Dict[str, Dict[str, ProbeResult]] = field(default_factory=dict)
    method: str = "ridge"
    pool: object = "quadrants"
    dataset: str = ""

    def to_dict(self) -> dict:
        raise NotImplementedError

    def table(self) -> str:
        raise NotImplementedError


def evaluate(model, dataset, layers, method="ridge", pool="quadrants", baselines=("random",), **kwargs) -> ProbeReport:
    """Per-layer train/test accuracy of linear probes on ``model`` and on each baseline."""
    raise NotImplementedError
