"""Data parallelism for local rules: ranks that each see a shard of a global batch end every step with
the state one process would have after the whole batch.

Two things must be combined across the ranks of ``torch.distributed``'s default process group:

- the plastic gradients. Every built-in rule's update is a sum over samples and positions (Miconi
  2021's surrogate losses), so the global batch's gradient is the sum of the shards' gradients
  (``reduction="sum"``) or their average weighted by shard size (``reduction="mean"``):
  :func:`reduce_gradients` with weight 1 or n_r / N.
- the competition statistics that move in the forward pass, e.g. the k-WTA thresholds of Miconi 2021,
  theta_c += mu * (rate_c - k/C). That update is linear in the batch's win rate, and the global rate is
  the shard rates averaged with weights n_r / N, so averaging the thresholds that each rank moved from
  the same start, weighted by shard size, gives exactly the single-process thresholds:
  :func:`sync_buffers` on :func:`synced_buffers` (what ``Plasticity.sync`` does).

Every function here is a collective: all ranks call it at the same point. Each is a no-op when
``torch.distributed`` is unavailable, not initialised, or has one rank.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device(like: Optional[torch.Tensor] = None) -> torch.device:
    """Where a collective on ``like`` runs in the default process group: the current CUDA device under
    NCCL alone; ``like``'s CUDA device where the group also has NCCL (e.g. "cpu:gloo,cuda:nccl"); else CPU."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if like is not None and like.device.type == "cuda" and "nccl" in backend:
        return like.device
    return torch.device("cpu")


def synced_buffers(*modules: nn.Module) -> List[torch.Tensor]:
    """The competition state of ``modules`` and their submodules: each buffer named in a module's
    ``synced_buffers`` attribute (e.g. ``KWTA.theta``, Miconi 2021's ``HomeostaticTriangle.theta``),
    every tensor once, in module order."""
    out, seen = [], set()
    for root in modules:
        for module in root.modules():
            for name in getattr(module, "synced_buffers", ()):
                buffer = getattr(module, name, None)
                if isinstance(buffer, torch.Tensor) and id(buffer) not in seen:
                    seen.add(id(buffer))
                    out.append(buffer)
    return out


def sync_buffers(buffers: Iterable[torch.Tensor], weight: Optional[float] = None) -> None:
    """Replace each floating-point tensor of ``buffers``, in place, by its average over the ranks,
    rank r weighted by its ``weight`` (e.g. its number of samples in the batch; None: equal weights).
    When every weight is 0 nothing changes. Other dtypes are copied from rank 0."""
    if not is_distributed():
        return
    buffers = list(buffers)
    floats = [b for b in buffers if b.is_floating_point()]
    others = [b for b in buffers if not b.is_floating_point()]
    w = 1.0 if weight is None else float(weight)
    if not w >= 0.0:
        raise ValueError(f"sync_buffers: weight must be a number >= 0 (this rank's share of the batch), got {weight!r}")
    if floats:
        device = collective_device(floats[0])
        flat = torch.cat([b.detach().reshape(-1).to(device, torch.float64) * w for b in floats] +
                         [torch.tensor([w], dtype=torch.float64, device=device)])
        dist.all_reduce(flat)
        total = flat[-1].item()
        if total > 0:
            averaged = flat[:-1] / total
            with torch.no_grad():
                for b, value in zip(floats, averaged.split([b.numel() for b in floats])):
                    b.copy_(value.reshape(b.shape))
    for b in others:
        device = collective_device(b)
        value = b.detach().to(device).clone()
        dist.broadcast(value, src=0)
        with torch.no_grad():
            b.copy_(value)


def reduce_gradients(parameters: Iterable[torch.Tensor], weight: float = 1.0) -> None:
    """Set each parameter's ``.grad`` to the sum over ranks of ``weight`` x that rank's gradient, in one
    all-reduce: weight 1 under ``reduction="sum"`` (the global batch's gradient is the sum of the shards'),
    n_r / N under ``reduction="mean"`` (rank r's share of the N samples). A missing gradient counts as
    zero; a parameter with no gradient on any rank keeps none."""
    if not is_distributed():
        return
    params = list(parameters)
    if not params:
        return
    device = collective_device(params[0])
    parts = [(p.grad.detach().reshape(-1).to(device, torch.float64) * float(weight)) if p.grad is not None
             else torch.zeros(p.numel(), dtype=torch.float64, device=device) for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=device)
    flat = torch.cat(parts + [present])
    dist.all_reduce(flat)
    values, present = flat[:-len(params)].split([p.numel() for p in params]), flat[-len(params):]
    for p, value, has in zip(params, values, present.tolist()):
        if has > 0:
            p.grad = value.reshape(p.shape).to(p.device, p.dtype)


def broadcast_state(*modules: nn.Module) -> None:
    """Copy rank 0's parameters and buffers (its ``state_dict``) of each module to every rank, in place."""
    if not is_distributed():
        return
    for module in modules:
        for value in module.state_dict().values():
            if not isinstance(value, torch.Tensor) or value.numel() == 0:
                continue
            buffer = value.detach().to(collective_device(value)).contiguous().clone()
            dist.broadcast(buffer, src=0)
            with torch.no_grad():
                value.copy_(buffer)
