"""Checkpoints written atomically and read back with clear errors, so that training resumes exactly.

A training run is fully described by the model's ``state_dict`` (pruning masks included), the
:class:`hebbloss.Plasticity` handle's ``state_dict`` (k-WTA thresholds and other post-signal
state), the optimizer's ``state_dict``, the random number generators (torch's global one, Python's,
and the generator that orders the data) and the position in training (epoch, step). With all of it
saved, a resumed run continues bit-for-bit as if it had never stopped (Miconi 2021 recipes
train for many epochs; an interrupted run should not have to start over).

Files are written with :func:`hebbloss.atomic.atomic_file` (a temporary file, fsync, rename), so a
crash leaves either the old file or the new one, never half. The state is stored with the SHA-256
digest of its bytes, so a file damaged on disk or in transfer is refused as corrupt instead of
loading wrong numbers.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from .atomic import atomic_file  # noqa: F401  (its home is hebbloss.atomic; kept importable from here)

FORMAT = "hebbloss-checkpoint"
VERSION = 2  # 2: the state is stored with its SHA-256 digest; 1: the state alone (still read)
PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


def save(path: PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` (a dict of tensors, numbers, strings, lists) atomically to ``path``.

    The state is serialised with :func:`torch.save` and stored, with the SHA-256 digest of those bytes,
    in a file that :func:`torch.load` can still open (format version 2); :func:`load` checks the digest.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    payload = buffer.getbuffer()
    wrapper = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
               "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    with atomic_file(path) as f:
        torch.save(wrapper, f)
    return path


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupt ({why}) and cannot be used. Nothing was changed; restore the file "
        "from a backup, or start the training again without it."
    )


def load(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save` and return its state; a missing file raises
    FileNotFoundError, a truncated, damaged (checksum mismatch) or foreign one :class:`CheckpointError`,
    each naming the file and what to do. Version-1 files (written before checksums) still load."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path, or start the training afresh")
    state = _read(path, path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a hebbloss checkpoint (no '{FORMAT}' marker); pass a file written by hebbloss")
    version = state.get("version")
    if version == 1 and not {"sha256", "payload"} & set(state):
        return state  # written before checksums: nothing to verify
    if isinstance(version, int) and version > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}; this hebbloss reads up to {VERSION}: upgrade hebbloss")
    if version != VERSION or not isinstance(state.get("sha256"), str) or not isinstance(state.get("payload"), torch.Tensor):
        raise _corrupt(path, "its header is damaged")
    payload = state["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != state["sha256"]:
        raise _corrupt(path, "checksum mismatch")
    inner = _read(io.BytesIO(payload), path, map_location)
    if not isinstance(inner, dict) or inner.get("format") != FORMAT or inner.get("version") != VERSION:
        raise _corrupt(path, "its content has no checkpoint marker")
    return inner


def _read(source, path: Path, map_location) -> Any:
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:  # zip reader, unpickler and EOF errors all mean the same thing here
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and cannot be read ({type(e).__name__}: {e}). "
            "Nothing was changed; restore the file from a backup, or start the training again without it."
        ) from None


def rng_state(generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """The states of torch's global RNG (CPU and CUDA), Python's ``random`` and ``generator``."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: Mapping[str, Any], generator: Optional[torch.Generator] = None) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def check_fits(module: nn.Module, saved: Mapping[str, torch.Tensor], what: str, path: PathLike = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``saved`` has exactly ``module``'s state_dict keys and shapes.

    Run before any ``load_state_dict`` so that a checkpoint of another model changes nothing.
    """
    have = module.state_dict()
    missing = sorted(set(have) - set(saved))
    extra = sorted(set(saved) - set(have))
    shapes = [
        f"{k}: saved {tuple(saved[k].shape)}, now {tuple(have[k].shape)}"
        for k in have
        if k in saved and isinstance(saved[k], torch.Tensor) and tuple(saved[k].shape) != tuple(have[k].shape)
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        if shapes:
            parts.append("shape mismatches " + "; ".join(shapes[:8]))
        raise CheckpointError(
            f"the {what} state in {path} does not fit the {what} built now ({', '.join(parts)}); "
            "resume with the same model, dataset and settings the checkpoint was written with"
        )


def training_state(
    model: nn.Module,
    plastic: Optional[nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    generator: Optional[torch.Generator] = None,
    **progress: Any,
) -> Dict[str, Any]:
    """Everything needed to continue training exactly: states of model, plasticity handle, optimizer,
    random generators, plus ``progress`` (e.g. epoch=, step=, config=)."""
    return {
        "model": model.state_dict(),
        "plastic": plastic.state_dict() if plastic is not None else {},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(generator),
        "progress": dict(progress),
    }


def restore_training_state(
    state: Mapping[str, Any],
    model: nn.Module,
    plastic: Optional[nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    generator: Optional[torch.Generator] = None,
    path: PathLike = "checkpoint",
) -> Dict[str, Any]:
    """Load what :func:`training_state` saved into freshly built objects; return its ``progress``.

    Every key and shape is checked before anything is loaded, so a mismatching checkpoint raises
    :class:`CheckpointError` and leaves the model, handle and optimizer untouched.
    """
    for key in ("model", "plastic", "optimizer", "rng", "progress"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry; it was not written by hebbloss training")
    check_fits(model, state["model"], "model", path)
    if plastic is not None:
        check_fits(plastic, state["plastic"], "plasticity (post signals)", path)
    if optimizer is not None:
        saved = state["optimizer"]
        if saved is None or len(saved["param_groups"]) != len(optimizer.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved["param_groups"], optimizer.param_groups)
        ):
            raise CheckpointError(f"the optimizer state in {path} does not fit the optimizer built now; resume with the same settings")
    model.load_state_dict(state["model"])
    if plastic is not None:
        plastic.load_state_dict(state["plastic"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], generator)
    return dict(state["progress"])
