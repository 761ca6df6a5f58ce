"""Layer-by-layer linear probes: capture pooled features of named layers and fit linear readouts.

    report = hebbloss.probe.evaluate(model, dataset, layers=["conv1", "conv2"], method="ridge")
    print(report.table())
"""
from .evaluate import PAPER_METHODS, ProbeReport, evaluate, paper_readout
from .feature_cache import FeatureCache, cache_features
from .features import capture_features
from .logistic import fit_logistic
from .pooling import pool_features
from .readouts import READOUTS, evaluate_paper_readout, miconi_readout, paper_readout_for, softhebb_readout
from .result import ProbeResult
from .ridge import RidgeAccumulator, choose_alpha, fit_ridge

__all__ = [
    "FeatureCache", "PAPER_METHODS", "ProbeReport", "ProbeResult", "READOUTS", "RidgeAccumulator", "cache_features", "capture_features",
    "choose_alpha", "evaluate", "evaluate_paper_readout", "fit_logistic", "fit_ridge", "miconi_readout",
    "paper_readout", "paper_readout_for", "pool_features", "softhebb_readout",
]
