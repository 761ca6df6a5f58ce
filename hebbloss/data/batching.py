"""Fast mini-batches straight from uint8 tensors: no PIL, no per-item Python in the loop."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple, Union

import torch


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
    """Yield (float images scaled to [0, 1] and optionally normalised per channel, labels) batches."""
    raise NotImplementedError
