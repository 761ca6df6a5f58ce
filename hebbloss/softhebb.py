"""SoftHebb's optimizer extras (Journe et al. 2023); their home is :mod:`hebbloss.optim` (``init_radius``: :mod:`hebbloss.init`)."""
from .init import init_radius
from .optim import UpdateScaling, maxabs_normalize, norm_rate, param_groups, scale_updates

__all__ = ["UpdateScaling", "init_radius", "maxabs_normalize", "norm_rate", "param_groups", "scale_updates"]
