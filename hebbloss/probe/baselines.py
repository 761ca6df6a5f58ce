"""Baselines probed in the same harness as the model: the same architecture with random weights, and
(optionally) the same architecture trained end to end by backprop with a linear head."""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from .. import layers

from ..data.batching import batches
from .features import model_device

BASELINES = ("random", "backprop")


def random_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with ``reset_parameters()`` called on every submodule that has it
    (weights re-drawn from their default init, BatchNorm statistics reset); the global RNG is untouched.
    Parameters outside such submodules (e.g. a ViT's position embedding) keep the model's values.
    Layers pruned by torch.nn.utils.prune keep their masks and get a re-drawn ``weight_orig``.
    The hooks of live ``attach``/``feedback.convert`` handles do nothing in the copy (it runs as the
    plain model) and the handles keep working on ``model``."""
    pruned = [m for m in model.modules() if layers.is_pruned(m)]
    # after a training forward, a pruned layer's ``weight`` is a non-leaf tensor that deepcopy refuses
    memo = {id(m.weight): m.weight.detach().clone() for m in pruned}
    net = copy.deepcopy(model, memo)  # the hooks of hebbloss handles are inert in a copy (hebbloss._hooks)
    device = model_device(net)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            for m in net.modules():
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
                    if layers.is_pruned(m):  # reset_parameters re-drew ``weight``; the layer computes with weight_orig
                        m.weight_orig.copy_(m.weight)
                        m.weight = m.weight_orig * m.weight_mask
    return net


def backprop_copy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    seed: int = 0,
) -> nn.Module:
    """A randomly re-initialised copy of ``model`` trained end to end, with a linear head on its flattened
    output, by cross-entropy and Adam(lr) for ``epochs``; returns the copy (without the head), in eval mode."""
    net = random_copy(model, seed)
    device = model_device(net)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = net.eval()(next(batches(images[:2], labels[:2], 2, device=device, mean=mean, std=std))[0])
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the backprop baseline needs {type(model).__name__} to return a tensor, got {type(out).__name__}")
        head = nn.Linear(out[0].numel(), num_classes).to(device)
        opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=lr)
        net.train()
        for _ in range(epochs):
            for x, y in batches(images, labels, batch_size, shuffle=True, generator=g, device=device, mean=mean, std=std):
                loss = nn.functional.cross_entropy(head(net(x).flatten(1)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return net.eval()
