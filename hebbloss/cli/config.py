"""Settings of a ``hebbloss`` run: defaults, a YAML config file whose keys mirror the flags, and flags.

Precedence: defaults < config file (``--config``) < flags. A resumed run takes its settings from
the ``config.yaml`` saved in its results folder; only the keys in :data:`RESUMABLE` may then change.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping

import yaml

from ..atomic import write_text

DEFAULTS: Dict[str, Any] = {
    # data
    "dataset": None,          # None: the embedded default dataset (hebbloss.data.DEFAULT_DATASET)
    "data_dir": None,
    "download": False,
    "cache_dir": None,
    "limit": None,            # use a random subset of N training and N test images
    "zca": None,              # ZCA-whiten the input (None: for miconi2021, as in the paper; else per-channel standardisation)
    # model and plasticity
    "model": None,            # None: the small default reference network; or a name, or timm:NAME
    "model_args": {},         # keyword arguments of the model's builder (--model-arg KEY=VALUE)
    "layers": None,           # plastic layers (names, globs, regexes); None: the recipe's or every supported one
    "rule": None,             # None: the recipe's, or "oja" for other models
    "post": None,             # identity | relu | kwta[:K[:MU]] | softwta[:BETA] | triangle[:POWER]; None: the recipe's, or relu
    "lr": None,               # None: the recipe's, or 1e-3
    "layer_lr": {},           # {pattern: lr} per-layer learning rates (later patterns win)
    "optimizer": None,        # sgd | adam; None: the recipe's, or adam
    "streaming": False,       # attach(streaming=True): updates taken in the forward, activations freed layer by layer
    "prune": None,            # fraction of connections removed (fixed random masks) in plastic layers after the first
    "epochs": None,           # None: the recipe's, or 1
    "warmup_steps": None,     # steps with no weight update at the start; None: the recipe's, or 0
    "batch_size": None,       # None: the recipe's, or 64
    "seed": 0,
    "device": "cpu",
    # checkpoints
    "checkpoint_every": 500,  # optimizer steps between checkpoints (also one at the end of every epoch)
    "max_steps": None,        # stop (with a checkpoint) after this many steps in this invocation
    # probe
    "probe_layers": None,     # None: the model's feature layers
    "method": "ridge",        # ridge | logistic | paper (the model's paper's readout) | softhebb | miconi
    "pool": None,             # quadrants | global | flatten | an int grid size; None: quadrants, or the paper readout's
    "readout_epochs": None,   # epochs of the logistic / softhebb readout; None: 50 (the paper's)
    "feature_memory": None,   # bytes of features held in memory (e.g. 4G); None: half the memory available now
    "baselines": ["random"],
    # output
    "out": None,              # results folder; None: hebbloss-results/<name>
    "name": None,             # run name; None: <model>-<dataset>-<timestamp>
    "progress": True,
}

# Keys a resumed run may change: they do not alter what has been trained so far (streaming changes
# only when the same updates are computed).
RESUMABLE = {"epochs", "max_steps", "checkpoint_every", "device", "progress", "probe_layers", "method", "pool",
             "readout_epochs", "feature_memory", "baselines", "data_dir", "cache_dir", "download", "streaming"}


class ConfigError(ValueError):
    """A bad config file or flag; the message names it and says what to do."""


def normalise_keys(raw: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """Keys with '-' or '_' alike; unknown keys raise :class:`ConfigError` listing the valid ones."""
    out = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        if k not in DEFAULTS:
            raise ConfigError(f"{source}: unknown setting {key!r}; valid settings are {', '.join(sorted(DEFAULTS))}")
        out[k] = value
    return out


_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_bytes(value: Any, key: str = "feature_memory") -> Any:
    """A size in bytes from a number or a text such as 4G, 500M, 2.5GiB or 1024 (binary units); None stays None."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    try:
        size = float(text[:len(text) - len(unit)]) * _UNITS[unit]
    except ValueError:
        size = -1
    if not size > 0:
        raise ConfigError(f"{key}: {value!r} is not a size; give bytes or a size such as 4G, 500M or 2.5GiB")
    return int(size)


def read_file(path: str) -> Dict[str, Any]:
    """The settings in a YAML config file, checked."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass the path of a YAML file whose keys mirror the flags")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings (key: value), got {type(raw).__name__}")
    return normalise_keys(raw, f"config file {p}")


def merge(*layers: Mapping[str, Any]) -> Dict[str, Any]:
    """DEFAULTS updated by each mapping in turn."""
    cfg = dict(DEFAULTS)
    for layer in layers:
        cfg.update(layer)
    return cfg


def check_resume_overrides(saved: Mapping[str, Any], flags: Mapping[str, Any], folder: Path) -> None:
    """Refuse flags that would change what a resumed run has already trained."""
    bad = sorted(k for k, v in flags.items() if k not in RESUMABLE and k not in ("out", "name") and saved.get(k) != v)
    if bad:
        shown = ", ".join(f"{k} (saved {saved.get(k)!r}, given {flags[k]!r})" for k in bad)
        raise ConfigError(
            f"cannot change {shown} when resuming {folder}: the checkpoint was trained with the saved settings. "
            f"Only {', '.join(sorted(RESUMABLE))} may change; start a new run (another --out) to change the others."
        )


def write(path: Path, cfg: Mapping[str, Any]) -> None:
    """Save the settings as YAML, atomically."""
    write_text(path, yaml.safe_dump(dict(cfg), sort_keys=True))
