"""Layer-by-layer linear probes: capture pooled features of named layers and fit linear readouts.

    report = hebbloss.probe.evaluate(model, dataset, layers=["conv1", "conv2"], method="ridge")
    print(report.table())
"""
from .evaluate import ProbeReport, evaluate
from .features import capture_features
from .logistic import fit_logistic
from .pooling import pool_features
from .result import ProbeResult
from .ridge import RidgeAccumulator, fit_ridge

__all__ = [
    "ProbeReport", "ProbeResult", "RidgeAccumulator", "capture_features", "evaluate", "fit_logistic",
    "fit_ridge", "pool_features",
]
