"""On-disk cache of decoded datasets: one .pt file per (dataset, source), written atomically."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..atomic import atomic_file
from .dataset import ImageDataset

FORMAT = 1  # bump when the cached layout changes


def cache_root(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """``cache_dir``, else ``$HEBBLOSS_CACHE``, else ``~/.cache/hebbloss``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HEBBLOSS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hebbloss"


def cache_path(root: Path, name: str, source: str) -> Path:
    """The cache file of dataset ``name`` decoded from ``source`` (a description of the files read)."""
    digest = hashlib.sha1(f"{FORMAT}|{source}".encode()).hexdigest()[:12]
    return root / f"{name}-{digest}.pt"


def save(dataset: ImageDataset, path: Path) -> None:
    """Write ``dataset`` to ``path`` atomically (:func:`hebbloss.atomic.atomic_file`: never a half-written cache)."""
    payload = {
        "format": FORMAT,
        "name": dataset.name,
        "classes": list(dataset.classes),
        "train_images": dataset.train_images.contiguous(),
        "train_labels": dataset.train_labels.contiguous(),
        "test_images": dataset.test_images.contiguous(),
        "test_labels": dataset.test_labels.contiguous(),
    }
    with atomic_file(path) as f:
        torch.save(payload, f)


def load(path: Path) -> Optional[ImageDataset]:
    """The dataset cached at ``path``, or None when it is absent, unreadable or of an older format."""
    try:
        payload = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return None
    return ImageDataset(
        payload["train_images"], payload["train_labels"], payload["test_images"], payload["test_labels"],
        list(payload["classes"]), payload["name"],
    )


def latest(root: Path, name: str) -> Optional[Path]:
    """The most recently written cache file of ``name`` from any source, or None."""
    found = sorted(root.glob(f"{name}-*.pt"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return found[-1] if found else None
