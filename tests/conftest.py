"""Shared test settings: hypothesis profiles keep the suite under 10 minutes on 2 cores.

HYPOTHESIS_PROFILE=thorough runs many more examples (for a nightly or a release).
"""
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture
def shared_datasets():
    """../shared/datasets when present; otherwise the test is skipped with the reason."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"offline datasets not found at {SHARED_DATASETS} (only present on the project's machines)")
    return SHARED_DATASETS


@pytest.fixture
def float64_default():
    """torch's default dtype set to float64 for the test (references are float64), then restored."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def spy(monkeypatch):
    """spy(module, name, key): module.name wrapped for the test, each call appending key(*args) to the
    list returned (the function still runs)."""
    def install(module, name, key):
        calls = []
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(key(*args, **kwargs))
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)
        return calls
    return install


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
