"""``hebbloss train|run`` under ``torchrun``: several processes, one job.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT); with WORLD_SIZE > 1 the
command joins the default process group (``env://``, or the init method in ``HEBBLOSS_DIST_INIT``,
e.g. ``file:///shared/rendezvous``; NCCL for a CUDA ``--device``, each rank on GPU LOCAL_RANK; gloo
otherwise). Each global batch (``--batch-size``) is split into contiguous slices, rank r taking the
r-th; the ranks draw the same data order from identically seeded generators. After each step the
plastic gradients and the competition state are combined (:mod:`hebbloss.distributed`) so that every
rank holds what one process would after the whole batch. Rank 0 alone prints and writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import distributed

INIT_ENV = "HEBBLOSS_DIST_INIT"


@dataclass
class Ranks:
    """This process's place in the job: ``rank`` of ``world_size`` (1: a single process)."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # whether this process initialised the default group (and so destroys it)

    @property
    def main(self) -> bool:
        """Whether this process prints and writes files (rank 0)."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def shard(self, indices: torch.Tensor, reduction: str) -> Tuple[torch.Tensor, float]:
        """This rank's contiguous slice of a global batch (sizes differ by at most one) and the weight of
        its gradient in the global one: 1 for a summed surrogate loss, n_r / N for a mean one."""
        if not self.parallel:
            return indices, 1.0
        mine = torch.tensor_split(indices, self.world_size)[self.rank]
        return mine, 1.0 if reduction == "sum" else len(mine) / max(1, len(indices))

    def combine(self, parameters: Sequence[torch.Tensor], loss: float, weight: float, stop: bool) -> Tuple[float, bool]:
        """The global batch's gradient in each parameter's ``.grad`` (pass none during the warm-up), the
        global loss (the ranks' losses combined as the gradients are), and whether any rank asked to stop."""
        if not self.parallel:
            return loss, stop
        distributed.reduce_gradients(parameters, weight)
        device = distributed.collective_device()
        flat = torch.tensor([loss * weight, float(stop)], dtype=torch.float64, device=device)
        dist.all_reduce(flat)
        return flat[0].item(), flat[1].item() > 0

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on rank 0 alone (it reads or checks files), its result or its error given to every rank."""
        if not self.parallel:
            return fn()
        payload: list = [None]
        if self.main:
            try:
                payload = [("ok", fn())]
            except Exception as e:  # handed to every rank, raised there too
                payload = [("error", e)]
        dist.broadcast_object_list(payload, src=0)
        kind, value = payload[0]
        if kind == "error":
            raise value
        return value

    def agree(self, ok: bool) -> bool:
        """Whether every rank is ``ok`` (e.g. passed its checks); a collective."""
        if not self.parallel:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=distributed.collective_device())
        dist.all_reduce(flag)
        return flag.item() == 0

    def close(self) -> None:
        """Leave the process group (when this process created it); later work (the probe) runs alone."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def world_from_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them); "
                         f"got RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, "
                         f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}") from None


def start() -> Ranks:
    """Join the job torchrun started (a no-op for a single process, or when the default group exists
    already): gloo for CPU tensors, and NCCL for CUDA ones where this node has GPUs, each rank then on
    GPU LOCAL_RANK (so ``--device cuda`` means each rank's own GPU)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), owns_group=False)
    rank, world, local = world_from_env()
    if world <= 1:
        return Ranks()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} asks for {world} processes, but this torch build has no torch.distributed")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local < gpus:
        torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl" if gpus else "gloo",  # alike on every rank of a node
                            init_method=os.environ.get(INIT_ENV) or "env://", rank=rank, world_size=world)
    return Ranks(rank, world, owns_group=True)


def check_device(device: Optional[str], ranks: Ranks) -> None:
    """A CUDA ``--device`` needs one GPU per process on each node."""
    if ranks.parallel and str(device or "cpu").startswith("cuda"):
        local, gpus = world_from_env()[2], torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local >= gpus:
            raise RuntimeError(f"--device {device} with LOCAL_RANK={local}: this node has {gpus} CUDA devices; start "
                               "at most that many processes per node (torchrun --nproc_per_node)")


def probe_rank() -> int:
    """The rank of a ``hebbloss probe`` started by torchrun (it runs on rank 0 alone)."""
    return world_from_env()[0]
