"""The one entry point to every dataset hebbloss knows: name -> decoded, cached ImageDataset."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

from .dataset import ImageDataset

DEFAULT_DATASET = "mnist-mini"


class DatasetMissing(FileNotFoundError):
    """A dataset is not on disk and could not be downloaded; the message says which files to put where."""


def available_datasets() -> List[str]:
    """Names accepted by :func:`load_dataset`."""
    raise NotImplementedError


def load_dataset(
    name: str,
    data_dir: Optional[Union[str, Path]] = None,
    download: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
) -> ImageDataset:
    """Load dataset ``name`` as uint8 tensors, decoding local files (or a torchvision download) once and
    caching the result as a .pt file in ``cache_dir`` (default ``$HEBBLOSS_CACHE`` or ~/.cache/hebbloss)."""
    raise NotImplementedError
