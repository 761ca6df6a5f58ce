"""Features of a frozen network computed once and kept, so that many readout epochs cost only the readout.

A :class:`FeatureCache` holds an N x D feature matrix (float16 by default: half the memory of float32 and
ample precision for a linear readout, which computes in float32). It is kept in memory when it fits under
the memory limit, else written to a ``.npy`` file in a cache folder and memory-mapped, from which batches
stream. The limit is ``memory_limit`` bytes when given, else :data:`SAFETY_FRACTION` of the memory
available now (:func:`available_memory`), so there is no fixed refusal: a 50,000 x 24,576 float16 matrix
(2.5 GB, SoftHebb's depth-3 CIFAR-10 features) stays in memory on a 24 GiB machine.

The file is written through :func:`hebbloss.atomic.atomic_file` (a temporary file in the same folder,
renamed over the target only when complete), so an error leaves no partial cache behind.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_file
from ..selection import Targets
from .features import iter_features, resolve_layers
from .pooling import Pool

SAFETY_FRACTION = 0.5  # of the available memory that one cache may take (the readout needs the rest)
CHUNK_BYTES = 16 * 2 ** 20  # stored bytes read at once when streaming batches (larger buffers cost page faults)
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
PathLike = Union[str, os.PathLike]


def available_memory() -> int:
    """Bytes of memory available now: MemAvailable of /proc/meminfo (else free pages from os.sysconf),
    capped by the cgroup limit (memory.max minus memory.current) when there is one."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 0
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


class FeatureOverflowError(ValueError):
    """A feature too large for the cache's dtype (e.g. above 65504 for float16)."""


def _numpy_dtype(dtype: torch.dtype):
    if dtype not in _NUMPY:
        raise ValueError(f"a feature cache stores float16, float32 or float64, got dtype={dtype}")
    return np.dtype(_NUMPY[dtype])


class FeatureCache:
    """An N x D feature matrix in memory or memory-mapped from a ``.npy`` file; see the module docstring.

    Make one with :meth:`build` (from batches of features), :meth:`from_tensor` or :meth:`load` (a file
    written by an earlier :meth:`build`). ``cache[index]`` gives rows in the stored dtype;
    :meth:`batches` streams (indices, float32 rows) for training.
    """

    def __init__(self, data: Union[torch.Tensor, np.ndarray], path: Optional[Path] = None):
        if data.ndim != 2:
            raise ValueError(f"features must be a matrix [N, D], got shape {tuple(data.shape)}")
        self._data, self.path = data, path

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_tensor(cls, features: torch.Tensor) -> "FeatureCache":
        """Wrap an existing [N, D] tensor (no copy)."""
        return cls(features)

    @classmethod
    def load(cls, path: PathLike) -> "FeatureCache":
        """Memory-map the ``.npy`` file that :meth:`build` wrote to ``path`` (read-only)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature cache {path} does not exist; build it with FeatureCache.build(..., folder=...)")
        return cls(np.load(path, mmap_mode="r"), path)

    @classmethod
    def build(
        cls,
        batches: Iterable[torch.Tensor],
        num_samples: int,
        dim: Optional[int] = None,
        dtype: torch.dtype = torch.float16,
        memory_limit: Optional[float] = None,
        folder: Optional[PathLike] = None,
        name: str = "features",
    ) -> "FeatureCache":
        """Store the rows of ``batches`` ([B, D] tensors, in order, ``num_samples`` rows in all) as ``dtype``.

        In memory when N * D * itemsize <= ``memory_limit`` bytes (default: SAFETY_FRACTION of
        :func:`available_memory`), else in ``folder/name.npy`` (kept; reopen it with :meth:`load`) or,
        without ``folder``, in a temporary folder deleted with the cache. ``dim`` defaults to the width
        of the first batch. Raises ValueError if the batches do not give exactly num_samples x dim values.
        """
        it = iter(batches)
        first = next(it, None)
        if first is None:
            raise ValueError(f"the feature batches are empty, but num_samples={num_samples}")
        dim = int(first.shape[-1]) if dim is None else dim
        with FeatureCacheWriter(num_samples, dim, dtype, memory_limit, folder, name) as writer:
            for batch in itertools.chain([first], it):
                writer.write(batch)
            return writer.close()

    # ----------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self._data.shape[0])

    @property
    def dim(self) -> int:
        return int(self._data.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        if isinstance(self._data, torch.Tensor):
            return self._data.dtype
        return next(t for t, d in _NUMPY.items() if np.dtype(d) == self._data.dtype)

    @property
    def on_disk(self) -> bool:
        """True when the rows are memory-mapped from :attr:`path` rather than held in memory."""
        return not isinstance(self._data, torch.Tensor)

    def __getitem__(self, index) -> torch.Tensor:
        """Rows ``index`` (an int, a slice, or a 1-d tensor/array of row indices) in the stored dtype."""
        if isinstance(self._data, torch.Tensor):
            if isinstance(index, torch.Tensor) and index.dim() == 1:
                return self._data.index_select(0, index.to(self._data.device))
            return self._data[index]
        if isinstance(index, (int, slice)):
            return torch.from_numpy(np.array(self._data[index]))
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        order = torch.argsort(index)  # read the file in ascending order, then put the rows back in place
        rows = torch.from_numpy(np.array(self._data[index[order].numpy()]))
        out = torch.empty_like(rows)
        out[order] = rows
        return out

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: Optional[torch.Generator] = None,
        dtype: torch.dtype = torch.float32,
        device: Optional[Union[str, torch.device]] = None,
    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(row indices [B], rows [B, D] as ``dtype`` on ``device``) in batches of ``batch_size`` (the last
        one smaller), in order or in a random order from ``generator``. Rows are read in chunks of whole
        batches (about CHUNK_BYTES; sorted reads from a file) and converted batch by batch, so the same
        generator gives the same batches from memory and from disk."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        per_chunk = max(1, CHUNK_BYTES // (self.dim * self.dtype.itemsize * batch_size)) * batch_size
        for start in range(0, n, per_chunk):
            idx = order[start:start + per_chunk]
            rows = self[idx] if shuffle else self[start:start + idx.shape[0]]
            for i in range(0, idx.shape[0], batch_size):
                yield idx[i:i + batch_size], rows[i:i + batch_size].to(device=device, dtype=dtype)


class FeatureCacheWriter:
    """Writes ``num_samples`` x ``dim`` feature rows batch by batch into a :class:`FeatureCache`: in memory
    when they fit under ``memory_limit`` bytes (default: SAFETY_FRACTION of :func:`available_memory`), else
    atomically into ``folder/name.npy`` (a temporary folder when ``folder`` is None). Use it as a context
    manager: on an exception, or when closed with the wrong number of rows, nothing is left on disk."""

    def __init__(self, num_samples: int, dim: int, dtype: torch.dtype = torch.float16,
                 memory_limit: Optional[float] = None, folder: Optional[PathLike] = None, name: str = "features"):
        if not isinstance(num_samples, int) or num_samples < 1 or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"num_samples and dim must be positive ints, got num_samples={num_samples!r}, dim={dim!r}")
        self.num_samples, self.dim, self.dtype, self.rows = num_samples, dim, dtype, 0
        np_dtype = _numpy_dtype(dtype)
        limit = available_memory() * SAFETY_FRACTION if memory_limit is None else memory_limit
        self._data = self._file = self._context = self._owned = self.path = None
        if num_samples * dim * np_dtype.itemsize <= limit:
            self._data = torch.empty(num_samples, dim, dtype=dtype)
            return
        self._owned = Path(tempfile.mkdtemp(prefix="hebbloss-features-")) if folder is None else None
        self.path = (self._owned or Path(folder)) / f"{name}.npy"
        self._context = atomic_file(self.path)
        try:
            self._file = self._context.__enter__()
            header = {"descr": np.lib.format.dtype_to_descr(np_dtype), "fortran_order": False, "shape": (num_samples, dim)}
            np.lib.format.write_array_header_1_0(self._file, header)
        except BaseException as e:
            self.abort(e)
            raise

    @property
    def on_disk(self) -> bool:
        return self._data is None

    def write(self, batch: torch.Tensor) -> None:
        """Append the rows of ``batch`` [B, dim] (any float dtype and device)."""
        batch = batch.detach()
        if batch.dim() != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"feature batch of shape {tuple(batch.shape)} at row {self.rows}; expected [B, {self.dim}]")
        if self.rows + batch.shape[0] > self.num_samples:
            raise ValueError(f"the feature batches give more than num_samples={self.num_samples} rows")
        largest = float(batch.abs().max()) if batch.numel() else 0.0
        if largest > torch.finfo(self.dtype).max:
            raise FeatureOverflowError(f"a feature of magnitude {largest:.3g} at rows {self.rows}.. does not fit in {self.dtype} "
                             f"(at most {torch.finfo(self.dtype).max:.5g}); store the features as dtype=torch.float32")
        if self._data is not None:
            self._data[self.rows:self.rows + batch.shape[0]].copy_(batch)
        else:
            self._file.write(batch.to(device="cpu", dtype=self.dtype).contiguous().numpy().tobytes())
        self.rows += batch.shape[0]

    def close(self) -> FeatureCache:
        """The finished cache; ValueError (and nothing left on disk) unless exactly num_samples rows came."""
        if self.rows != self.num_samples:
            raise ValueError(f"the feature batches gave {self.rows} rows, but num_samples={self.num_samples}")
        if self._data is not None:
            return FeatureCache(self._data)
        context, self._context = self._context, None
        context.__exit__(None, None, None)
        cache = FeatureCache.load(self.path)
        if self._owned is not None:
            weakref.finalize(cache, shutil.rmtree, str(self._owned), True)
        return cache

    def abort(self, error: Optional[BaseException] = None) -> None:
        """Drop what was written (the temporary file, and the temporary folder if this writer made it)."""
        context, self._context = self._context, None
        if context is not None:
            error = error or RuntimeError("feature cache aborted")
            try:
                context.__exit__(type(error), error, error.__traceback__)
            except BaseException:
                pass
        if self._owned is not None:
            shutil.rmtree(self._owned, ignore_errors=True)
        self._data = None

    def __enter__(self) -> "FeatureCacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None or self._context is not None:
            self.abort(exc)


def cache_features(
    model: nn.Module,
    layers: Targets,
    images: torch.Tensor,
    batch_size: int = 256,
    pool: Pool = "flatten",
    device: Optional[Union[str, torch.device]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    use_timm: bool = True,
    dtype: torch.dtype = torch.float16,
    memory_limit: Optional[float] = None,
    folder: Optional[PathLike] = None,
) -> Dict[str, FeatureCache]:
    """The features of each layer chosen by ``layers`` for ``images``, from one pass of the frozen ``model``
    (eval mode, no_grad, as :func:`hebbloss.probe.features.iter_features` computes them; ``pool="flatten"``
    keeps every value), each stored as a :class:`FeatureCache` of ``dtype``.

    Caches go to memory while their total fits under ``memory_limit`` bytes (default: SAFETY_FRACTION of
    :func:`available_memory`), the rest to ``folder/<layer>.npy`` (a temporary folder when None).
    """
    chosen = resolve_layers(model, layers)
    n = int(images.shape[0])
    budget = available_memory() * SAFETY_FRACTION if memory_limit is None else memory_limit
    itemsize = _numpy_dtype(dtype).itemsize
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(contextlib.closing(iter_features(
            model, chosen, images, batch_size=batch_size, pool=pool, device=device, mean=mean, std=std, use_timm=use_timm)))
        first = next(stream, None)
        if first is None:
            raise ValueError("no images to compute features of")
        writers = {}
        for name, feats in first.items():
            size = n * int(feats.shape[1]) * itemsize
            limit = budget if size <= budget else 0  # in memory while the running total fits
            budget -= size if size <= budget else 0
            writers[name] = stack.enter_context(
                FeatureCacheWriter(n, int(feats.shape[1]), dtype, limit, folder, name.replace("/", "_")))
        for batch in itertools.chain([first], stream):
            for name, feats in batch.items():
                writers[name].write(feats)
        return {name: w.close() for name, w in writers.items()}


def cache_feature_sets(
    model: nn.Module,
    layers: Targets,
    image_sets: Sequence[torch.Tensor],
    folders: Optional[Sequence[Optional[PathLike]]] = None,
    memory_limit: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
    **options,
) -> List[Dict[str, FeatureCache]]:
    """:func:`cache_features` of each of ``image_sets`` (say the train and the test images) under one
    ``memory_limit`` for them all. ``dtype=None``: float16, or float32 for every set when a feature of
    any set exceeds float16's range (an untrained network without normalisation reaches 1e5; the
    float16 pass is then given up and redone). ``folders``: where each set's disk part goes."""
    folders = list(folders) if folders is not None else [None] * len(image_sets)
    for attempt in ([torch.float16, torch.float32] if dtype is None else [dtype]):
        limit = available_memory() * SAFETY_FRACTION if memory_limit is None else memory_limit
        caches: List[Dict[str, FeatureCache]] = []
        try:
            for images, folder in zip(image_sets, folders):
                cache = cache_features(model, layers, images, dtype=attempt, memory_limit=limit, folder=folder, **options)
                limit -= sum(len(c) * c.dim * c.dtype.itemsize for c in cache.values() if not c.on_disk)
                caches.append(cache)
            return caches
        except FeatureOverflowError:
            if dtype is not None or attempt == torch.float32:
                raise
            caches.clear()  # dropping them frees memory and deletes their temporary files
    raise AssertionError("unreachable")


def as_cache(features: Union[FeatureCache, torch.Tensor]) -> FeatureCache:
    """``features`` as a FeatureCache (a tensor [N, D] is wrapped without a copy)."""
    return features if isinstance(features, FeatureCache) else FeatureCache.from_tensor(features)
