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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint


@dataclass
class TrainState:
    """Where training stands: epochs completed, steps done in the current epoch, steps overall."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_rng: Optional[torch.Tensor] = None  # the order generator's state at the start of the epoch


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
) -> Dict[str, Any]:
    """Train ``model`` through the ``plastic`` handle for ``epochs`` epochs from ``state`` on uint8
    ``images`` turned into inputs by ``prepare``; ``save(state)``
    is called every ``checkpoint_every`` steps, at the end of every epoch and when stopping early.
    The first ``warmup_steps`` steps overall run the forward pass only (k-WTA thresholds adapt; no
    weight update), as Miconi 2021's code does for 200 batches.

    Returns {"completed": bool, "global_step", "epoch", "losses": mean surrogate loss per epoch run here,
    "seconds"}.
    """
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    losses, started, done_here = [], time.perf_counter(), 0
    model.train()
    with _StopFlag() as stop:
        while state.epoch < epochs:
            if state.step_in_epoch == 0 or state.epoch_rng is None:
                state.epoch_rng = generator.get_state()
            else:
                generator.set_state(state.epoch_rng)
            order = torch.randperm(n, generator=generator)
            total, count = 0.0, 0
            bar = tqdm(range(state.step_in_epoch, steps_per_epoch), desc=f"epoch {state.epoch + 1}/{epochs}",
                       disable=not progress, leave=False, unit="batch", mininterval=1.0)
            for step in bar:
                idx = order[step * batch_size:(step + 1) * batch_size]
                model(prepare(images[idx].to(device)))
                optimizer.zero_grad(set_to_none=True)
                loss = plastic.loss()
                if state.global_step >= warmup_steps:
                    loss.backward()
                    optimizer.step()
                    for fn in after_step:
                        fn()
                total, count = total + loss.item(), count + 1
                state.step_in_epoch, state.global_step, done_here = step + 1, state.global_step + 1, done_here + 1
                bar.set_postfix(loss=f"{total / count:.4g}")
                if state.step_in_epoch == steps_per_epoch:
                    break  # the end-of-epoch checkpoint below covers this step
                if stop.requested or (max_steps is not None and done_here >= max_steps):
                    save(state)
                    return _summary(False, state, losses + [total / count], started, stopped=stop.requested)
                if checkpoint_every and state.global_step % checkpoint_every == 0:
                    save(state)
            bar.close()
            if count:
                losses.append(total / count)
            state.epoch, state.step_in_epoch, state.epoch_rng = state.epoch + 1, 0, None
            save(state)
            if stop.requested or (max_steps is not None and done_here >= max_steps and state.epoch < epochs):
                return _summary(False, state, losses, started, stopped=stop.requested)
    return _summary(True, state, losses, started)


def _summary(completed, state, losses, started, stopped=False):
    return {
        "completed": completed,
        "interrupted": stopped,
        "epoch": state.epoch,
        "global_step": state.global_step,
        "losses": losses,
        "seconds": time.perf_counter() - started,
    }


def state_to_progress(state: TrainState) -> Dict[str, Any]:
    """The ``progress`` entry of a checkpoint."""
    return {"epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "global_step": state.global_step,
            "epoch_rng": state.epoch_rng}


def progress_to_state(progress: Dict[str, Any]) -> TrainState:
    return TrainState(progress["epoch"], progress["step_in_epoch"], progress["global_step"], progress.get("epoch_rng"))


def save_checkpoint(path: Path, model, plastic, optimizer, generator, state: TrainState, config: Dict[str, Any],
                    prepare: nn.Module) -> None:
    """Atomically write everything ``--resume`` needs to ``path`` (the input preprocessing included)."""
    checkpoint.save(path, {**checkpoint.training_state(model, plastic, optimizer, generator, **state_to_progress(state)),
                           "config": dict(config), "preprocess": prepare.state_dict()})
