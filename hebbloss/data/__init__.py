"""Image datasets as uint8 tensors, decoded once and cached on disk, with fast tensor batching.

    ds = hebbloss.data.load_dataset("mnist-mini")               # embedded, offline
    ds = hebbloss.data.load_dataset("cifar10", data_dir="/work/shared/datasets")
    for x, y in hebbloss.data.batches(ds.train_images, ds.train_labels, 256, shuffle=True):
        ...
"""
from .batching import batches
from .dataset import ImageDataset
from .registry import DEFAULT_DATASET, DatasetMissing, LocalCopy, available_datasets, find_local_copy, load_dataset

__all__ = ["DEFAULT_DATASET", "DatasetMissing", "ImageDataset", "LocalCopy", "available_datasets", "batches",
           "find_local_copy", "load_dataset"]
