"""Fast mini-batches straight from uint8 tensors: no PIL, no per-item Python in the loop."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple, Union

import torch


def _channel_stats(values, channels: int, what: str, device, dtype) -> Optional[torch.Tensor]:
    if values is None:
        return None
    t = torch.as_tensor(values, dtype=dtype).flatten()
    if t.numel() not in (1, channels):
        raise ValueError(f"{what} has {t.numel()} values but the images have {channels} channels; give 1 or {channels}")
    if what == "std" and (t <= 0).any():
        raise ValueError(f"std must be positive, got {t.tolist()}")
    return t.to(device).reshape(1, -1, *([1] * 2))


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    drop_last: bool = False,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) mini-batches: float32 images, uint8 ones scaled to [0, 1], then
    ``(x - mean) / std`` per channel when given; moved to ``device`` before the conversion (so a GPU
    does it). ``shuffle`` draws a fresh permutation from ``generator`` on every call."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in number")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    device = torch.device(device) if device is not None else images.device
    m = _channel_stats(mean, images.shape[1], "mean", device, torch.float32)
    s = _channel_stats(std, images.shape[1], "std", device, torch.float32)
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            x, y = images[idx], labels[idx]
        x = x.to(device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if m is not None:
            x = x.sub_(m)
        if s is not None:
            x = x.div_(s)
        yield x, y.to(device, non_blocking=True)
