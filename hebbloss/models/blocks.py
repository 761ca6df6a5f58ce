"""Small building blocks of the reference networks (Miconi 2021; Journe et al. 2023)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Standardize(nn.Module):
    """Per-sample standardisation: each sample shifted to mean 0 and scaled to std 1 over all of
    its channels and positions (Miconi 2021 applies it to every layer's input). It uses the
    population std; the paper's code divides by the sample std, 1.0002 times larger for a
    3x32x32 input."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[1:], eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a CPU input in channels-last layout and hands back the input's layout.

    The same values and the same gradient, bit for bit: the channels-last kernel is vectorised over the
    channels, where the NCHW one is not. The SoftHebb network's 4x4 pool (stride 2, padding 1) over its
    first layer's [64, 96, 32, 32] took 70 ms that way and 15 ms with both layout copies (Xeon, AVX512,
    1 thread), in the forward of every mode (a backprop step gains nothing in all: the pooling's backward
    takes longer channels-last). Other devices, and torch.compile, pool as they are.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dim() != 4 \
                or x.is_contiguous(memory_format=torch.channels_last):  # a compiled graph pools its own way
            return super().forward(x)
        pooled = super().forward(x.contiguous(memory_format=torch.channels_last))
        return pooled.contiguous() if x.is_contiguous() else pooled
