"""The training loop of ``hebbloss train``: one surrogate-loss step per mini-batch (Miconi 2021), with
checkpoints that make ``--resume`` continue bit-for-bit.

The data order of an epoch is a permutation drawn from a dedicated generator. A checkpoint stores
the generator's state as it was at the start of the epoch together with the number of steps done
in it, so a resumed run draws the same permutation and skips exactly the batches already seen.
Ctrl-C stops at the next step boundary and writes a checkpoint (press it twice to abort at once).
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint
from .distributed import Ranks
from ..data.augment import check_name, flip_mask, hflip


@dataclass
class TrainState:
    """Where training stands: epochs completed, steps done in the current epoch, steps overall."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_rng: Optional[torch.Tensor] = None  # the order generator's state at the start of the epoch
    seconds: float = 0.0  # training time up to this state, over every call (0 from a checkpoint that predates it)
    losses: List[Optional[float]] = field(default_factory=list)  # mean loss of each completed epoch, over every call
    epoch_loss: Tuple[float, int] = (0.0, 0)  # sum of the current epoch's step losses so far, and their number


class _StopFlag:
    """Turns the first SIGINT into a request to stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread: keep the default behaviour
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def train_step(model: nn.Module, plastic, optimizer: torch.optim.Optimizer, inputs: Optional[torch.Tensor], learn: bool = True,
               after_step: Sequence[Callable[[], None]] = (),
               combine: Optional[Callable[[float, bool], float]] = None) -> float:
    """One surrogate-loss step (Miconi 2021): forward ``inputs``, ``plastic.loss()``, then, when ``learn``, the
    backward pass, the optimizer step and each of ``after_step``; returns the loss value.

    Data parallel: ``combine(loss, learn)``, called between the backward pass and the optimizer step, turns
    this rank's gradients and loss into the global batch's (and returns the global loss); ``inputs`` None
    means this rank's share of the batch is empty (no forward; its gradients and loss count as zero)."""
    optimizer.zero_grad(set_to_none=True)
    value = 0.0
    if inputs is not None:
        model(inputs)
        loss = plastic.loss()
        if learn:
            loss.backward()
        value = loss.item()
    if combine is not None:
        value = combine(value, learn)
    if learn:
        optimizer.step()
        for fn in after_step:
            fn()
    return value


@dataclass
class _Run:
    """One call of :func:`run_training`: its settings, what it has done so far and the steps of its loop."""

    model: nn.Module
    plastic: Any
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    prepare: Callable[[torch.Tensor], torch.Tensor]
    epochs: int
    batch_size: int
    generator: torch.Generator
    save: Callable[[TrainState], None]
    checkpoint_every: Optional[int]
    max_steps: Optional[int]
    after_step: Sequence[Callable[[], None]]
    warmup_steps: int
    device: Any
    progress: bool
    augment: Optional[str] = None  # the recipe's training augmentation (hebbloss.data.augment), e.g. "hflip"
    ranks: Ranks = field(default_factory=Ranks)  # data parallel: this process's share of each batch
    stop_agreed: bool = False  # data parallel: some rank asked to stop (all ranks stop at the same step)
    done_here: int = 0
    started: float = field(default_factory=time.perf_counter)
    seconds_before: float = 0.0  # training time of the earlier calls (the resumed state's)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.images.shape[0] / self.batch_size)

    def epoch_order(self, state: TrainState) -> torch.Tensor:
        """The data order of the current epoch; a resumed epoch redraws the permutation it started with."""
        if state.step_in_epoch == 0 or state.epoch_rng is None:
            state.epoch_rng = self.generator.get_state()
        else:
            self.generator.set_state(state.epoch_rng)
        return torch.randperm(self.images.shape[0], generator=self.generator)

    def epoch_flips(self) -> Optional[torch.Tensor]:
        """Which images a horizontal flip mirrors this epoch (drawn right after the epoch's order, so a
        resumed epoch redraws the same ones), or None without augmentation."""
        return None if self.augment is None else flip_mask(self.images.shape[0], self.generator)

    def step(self, state: TrainState, idx: torch.Tensor, flips: Optional[torch.Tensor] = None,
             stop: Optional[_StopFlag] = None) -> float:
        """One training step on the images ``idx`` (forward only during the warm-up); counts it in ``state``.
        Data parallel: this rank trains on its slice of ``idx``; gradients, loss, competition state and
        the stop request are then combined over the ranks."""
        mine, weight = self.ranks.shard(idx, self.plastic.reduction) if self.ranks.parallel else (idx, 1.0)
        inputs = None
        if len(mine):
            batch = self.images[mine].to(self.device)
            if flips is not None:
                batch = hflip(batch, flips[mine])
            inputs = self.prepare(batch)
        combine = self.rank_combiner(weight, stop) if self.ranks.parallel else None
        loss = train_step(self.model, self.plastic, self.optimizer, inputs,
                          learn=state.global_step >= self.warmup_steps, after_step=self.after_step, combine=combine)
        if self.ranks.parallel:
            self.plastic.sync(batch_size=len(mine))
        state.step_in_epoch, state.global_step, self.done_here = state.step_in_epoch + 1, state.global_step + 1, self.done_here + 1
        return loss

    def rank_combiner(self, weight: float, stop: Optional[_StopFlag]) -> Callable[[float, bool], float]:
        """The hook ``train_step`` calls after backward (data parallel): averages the plastic gradients
        (when this step learns) and the loss over the ranks, weighting this rank's share by ``weight``,
        and agrees on the stop request."""
        def combine(loss: float, learn: bool) -> float:
            params = self.plastic.plastic_parameters() if learn else []
            loss, self.stop_agreed = self.ranks.combine(params, loss, weight, bool(stop and stop.requested))
            return loss
        return combine

    def stopping(self, stop: _StopFlag) -> bool:
        """Whether to stop at this step boundary: Ctrl-C here, or (data parallel) on any rank at the last step."""
        return self.stop_agreed if self.ranks.parallel else stop.requested

    def out_of_steps(self) -> bool:
        """Whether this call has done its ``max_steps``."""
        return self.max_steps is not None and self.done_here >= self.max_steps

    def checkpoint_if_due(self, state: TrainState) -> None:
        """Save every ``checkpoint_every`` steps overall."""
        if self.checkpoint_every and state.global_step % self.checkpoint_every == 0:
            self.save_state(state)

    def elapsed(self) -> float:
        """Seconds of this call so far."""
        return time.perf_counter() - self.started

    def save_state(self, state: TrainState) -> None:
        """``save(state)``, with the training time so far over every call."""
        state.seconds = self.seconds_before + self.elapsed()
        self.save(state)

    def epoch(self, state: TrainState, stop: _StopFlag) -> bool:
        """The rest of the current epoch, then a checkpoint; True when it stopped early (checkpoint written)."""
        order = self.epoch_order(state)
        flips = self.epoch_flips()
        total, count = state.epoch_loss  # (0.0, 0) at the start of an epoch
        bar = tqdm(range(state.step_in_epoch, self.steps_per_epoch), desc=f"epoch {state.epoch + 1}/{self.epochs}",
                   disable=not self.progress, leave=False, unit="batch", mininterval=1.0)
        with bar:
            for step in bar:
                total, count = total + self.step(state, order[step * self.batch_size:(step + 1) * self.batch_size], flips, stop), count + 1
                bar.set_postfix(loss=f"{total / count:.4g}")
                if state.step_in_epoch == self.steps_per_epoch:
                    break  # the end-of-epoch checkpoint below covers this step
                state.epoch_loss = (total, count)
                if self.stopping(stop) or self.out_of_steps():
                    self.save_state(state)
                    return True
                self.checkpoint_if_due(state)
        state.losses.append(total / count if count else None)
        state.epoch, state.step_in_epoch, state.epoch_rng, state.epoch_loss = state.epoch + 1, 0, None, (0.0, 0)
        self.save_state(state)
        return False

    def summary(self, completed: bool, state: TrainState, stopped: bool = False) -> Dict[str, Any]:
        """What :func:`run_training` returns."""
        elapsed = self.elapsed()
        return {
            "completed": completed,
            "interrupted": stopped,
            "epoch": state.epoch,
            "global_step": state.global_step,
            "losses": state.losses + ([state.epoch_loss[0] / state.epoch_loss[1]] if state.epoch_loss[1] else []),
            "seconds": self.seconds_before + elapsed,
            "seconds_this_call": elapsed,
        }


def run_training(
    model: nn.Module,
    plastic,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    state: TrainState,
    save: Callable[[TrainState], None],
    checkpoint_every: Optional[int] = None,
    max_steps: Optional[int] = None,
    after_step: Sequence[Callable[[], None]] = (),
    warmup_steps: int = 0,
    device="cpu",
    progress: bool = True,
    augment: Optional[str] = None,
    ranks: Optional[Ranks] = None,
) -> Dict[str, Any]:
    """Train ``model`` through the ``plastic`` handle for ``epochs`` epochs from ``state`` on uint8
    ``images`` turned into inputs by ``prepare``; ``save(state)``
    is called every ``checkpoint_every`` steps, at the end of every epoch and when stopping early.
    The first ``warmup_steps`` steps overall run the forward pass only (k-WTA thresholds adapt; no
    weight update), as Miconi 2021's code does for 200 batches. ``augment`` ("hflip" or None) mirrors
    a random half of the images each epoch, as Miconi 2021's Hebbian training does. ``ranks``: this
    process's place in a data-parallel job (``hebbloss.cli.distributed``); ``batch_size`` is then the
    global batch, and every rank ends each step with the state one process would have.

    Returns {"completed": bool, "global_step", "epoch", "losses": mean surrogate loss of each epoch over every
    call (a resumed ``state`` carries the earlier epochs' and the current epoch's sum so far; the last entry covers
    the steps done so far when it stopped mid-epoch; None for an epoch before a checkpoint that predates this),
    "seconds": training time over every call (a resumed ``state`` carries the earlier calls'),
    "seconds_this_call"}.
    """
    run = _Run(model, plastic, optimizer, images, prepare, epochs, batch_size, generator, save, checkpoint_every, max_steps,
               after_step, warmup_steps, device, progress, check_name(augment), ranks or Ranks(),
               seconds_before=state.seconds)
    model.train()
    with _StopFlag() as stop:
        while state.epoch < epochs:
            if run.epoch(state, stop) or run.stopping(stop) or (state.epoch < epochs and run.out_of_steps()):
                return run.summary(False, state, stopped=run.stopping(stop))
    return run.summary(True, state)


def state_to_progress(state: TrainState) -> Dict[str, Any]:
    """The ``progress`` entry of a checkpoint."""
    return {"epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "global_step": state.global_step,
            "epoch_rng": state.epoch_rng, "seconds": state.seconds, "losses": list(state.losses),
            "epoch_loss": list(state.epoch_loss)}


def progress_to_state(progress: Dict[str, Any]) -> TrainState:
    epoch = progress["epoch"]
    total, count = progress.get("epoch_loss", (0.0, 0))
    return TrainState(epoch, progress["step_in_epoch"], progress["global_step"], progress.get("epoch_rng"),
                      float(progress.get("seconds", 0.0)), list(progress.get("losses", [None] * epoch)),
                      (float(total), int(count)))


def save_checkpoint(path: Path, model, plastic, optimizer, generator, state: TrainState, config: Dict[str, Any],
                    prepare: nn.Module) -> None:
    """Atomically write everything ``--resume`` needs to ``path`` (the input preprocessing included)."""
    checkpoint.save(path, {**checkpoint.training_state(model, plastic, optimizer, generator, **state_to_progress(state)),
                           "config": dict(config), "preprocess": prepare.state_dict()})
