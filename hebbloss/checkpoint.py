"""Checkpoints written atomically and read back with clear errors, so that training resumes exactly.

A training run is fully described by the model's ``state_dict`` (pruning masks included), the
:class:`hebbloss.Plasticity` handle's ``state_dict`` (k-WTA thresholds and other post-signal
state), the optimizer's ``state_dict``, the random number generators (torch's global one, Python's,
and the generator that orders the data) and the position in training (epoch, step). With all of it
saved, ``--resume`` continues bit-for-bit as if the run had never stopped (Miconi 2021 recipes
train for many epochs; an interrupted run should not have to start over).

Files are written to a temporary file in the same folder, flushed to disk (fsync) and renamed over
the target with :func:`os.replace`, so a crash leaves either the old file or the new one, never half.
"""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Union

import torch
from torch import nn

FORMAT = "hebbloss-checkpoint"
VERSION = 1
PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Any]:
    """Open a binary temporary file next to ``path``; on success it is fsynced and renamed to ``path``.

    On any exception the temporary file is deleted and ``path`` is left exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions a plain open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible everywhere)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save(path: PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` (a dict of tensors, numbers, strings, lists) atomically to ``path`` with torch.save."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **state}
    with atomic_file(path) as f:
        torch.save(payload, f)
    return path


def load(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save`; a missing, truncated or foreign file raises
    :class:`CheckpointError` (or FileNotFoundError) naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path, or start without --resume")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip reader, unpickler and EOF errors all mean the same thing here
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and cannot be read ({type(e).__name__}: {e}). "
            "Nothing was changed; restore the file from a backup, or start the run again without --resume."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a hebbloss checkpoint (no '{FORMAT}' marker); pass a file written by hebbloss")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state['version']}; this hebbloss reads up to {VERSION}: upgrade hebbloss")
    return state


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
