"""Readers of ImageFolder trees (``split/<class>/<image>``), as folders or packed in a .tar(.gz).

Images are decoded with torchvision.io (JPEG in batched lists), once; every image of a split must have
the same size and number of channels.
"""
from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path, PurePosixPath
from typing import Dict, List, Tuple, Union

import numpy as np
import torch


def _torchvision_io():
    """torchvision.io, imported on first use (``import hebbloss`` does not import torchvision), or None
    where it cannot decode images (then PIL decodes them). Deprecated since torchvision 0.29 (moving to
    torchcodec), but fast and batched for JPEG."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision import io
        io.decode_jpeg, io.decode_image, io.ImageReadMode  # noqa: B018 (present in this torchvision?)
    except (ImportError, AttributeError):  # pragma: no cover - a torchvision without image decoding
        return None
    return io

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
Split = Tuple[torch.Tensor, torch.Tensor, List[str]]  # images uint8 [N,C,H,W], labels int64 [N], classes


def _decode_pil(blob: bytes, name: str, where: str) -> torch.Tensor:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(blob))
        img = img.convert("RGB") if img.mode not in ("L", "RGB", "RGBA") else img
        array = np.array(img)
    except OSError as e:
        raise ValueError(f"cannot decode image {name} in {where}: {e}") from e
    return torch.from_numpy(array[:, :, None] if array.ndim == 2 else array).permute(2, 0, 1).contiguous()


def _decode_all(blobs: List[bytes], names: List[str], where: str) -> torch.Tensor:
    """Decode encoded images into one uint8 [N, C, H, W] tensor (JPEGs in one batched call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out = _decode_list(blobs, names, where)
    return _stack(out, names, where)


def _decode_list(blobs: List[bytes], names: List[str], where: str) -> List[torch.Tensor]:
    tvio = _torchvision_io()
    if tvio is None:  # pragma: no cover
        return [_decode_pil(b, n, where) for b, n in zip(blobs, names)]
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    is_jpeg = [b[:3] == b"\xff\xd8\xff" for b in blobs]
    out: List[torch.Tensor] = [None] * len(datas)  # type: ignore[list-item]
    jpeg_idx = [i for i, j in enumerate(is_jpeg) if j]
    if jpeg_idx:
        try:
            decoded = tvio.decode_jpeg([datas[i] for i in jpeg_idx], mode=tvio.ImageReadMode.UNCHANGED)
        except RuntimeError:  # find the bad file and name it
            decoded = [_decode_pil(blobs[i], names[i], where) for i in jpeg_idx]
        for i, img in zip(jpeg_idx, decoded):
            out[i] = img
    for i, j in enumerate(is_jpeg):
        if not j:
            try:
                out[i] = tvio.decode_image(datas[i], mode=tvio.ImageReadMode.UNCHANGED)
            except RuntimeError as e:
                raise ValueError(f"cannot decode image {names[i]} in {where}: {e}") from e
    return out


def _stack(out: List[torch.Tensor], names: List[str], where: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        counts = {s: sum(tuple(t.shape) == s for t in out) for s in shapes}
        odd = next(names[i] for i, t in enumerate(out) if tuple(t.shape) != max(counts, key=counts.get))
        raise ValueError(
            f"images in {where} differ in size or channels {sorted(shapes)} (e.g. {odd}); "
            "resize them to one size (C, H, W) before loading"
        )
    return torch.stack(out) if out else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)


def _assemble(items: Dict[str, List[Tuple[str, bytes]]], where: str) -> Split:
    classes = sorted(items)
    names, blobs, labels = [], [], []
    for label, cls in enumerate(classes):
        for name, blob in sorted(items[cls]):
            names.append(name)
            blobs.append(blob)
            labels.append(label)
    return _decode_all(blobs, names, where), torch.tensor(labels, dtype=torch.int64), classes


def read_folder_split(root: Union[str, Path]) -> Split:
    """Images, labels and sorted class names of the ImageFolder tree ``root/<class>/<image>``."""
    root = Path(root)
    items: Dict[str, List[Tuple[str, bytes]]] = {}
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [f for f in sorted(cls_dir.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        items[cls_dir.name] = [(str(f), f.read_bytes()) for f in files]
    if not any(items.values()):
        raise ValueError(f"{root} holds no images in class folders (expected {root}/<class>/<image>.jpg)")
    return _assemble(items, str(root))


def read_tar_splits(path: Union[str, Path], splits=("train", "test")) -> Dict[str, Split]:
    """Each split of an ImageFolder tree packed in the tar(.gz) ``path``: ``[prefix/]split/<class>/<image>``."""
    path = Path(path)
    found: Dict[str, Dict[str, List[Tuple[str, bytes]]]] = {s: {} for s in splits}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or len(parts) < 3 or PurePosixPath(member.name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                split, cls = parts[-3], parts[-2]
                if split in found:
                    found[split].setdefault(cls, []).append((member.name, tar.extractfile(member).read()))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"cannot read {path} as a tar archive ({e}); download or copy it again") from e
    missing = [s for s in splits if not found[s]]
    if missing:
        raise ValueError(
            f"{path} has no images under {', '.join(s + '/<class>/' for s in missing)}; expected an ImageFolder tree "
            f"{'/, '.join(splits)}/ each holding <class>/<image>.jpg"
        )
    return {s: _assemble(found[s], f"{path}:{s}/") for s in splits}
