"""How far a converted model is from backprop, per layer (Lillicrap et al. 2016 measure the
angle between the feedback and the backprop signals; Moskovitz et al. 2018 and Amit 2019 the
alignment of B with W).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch
from torch import nn

from .._hooks import HookOwner
from .convert import layer_state


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle in degrees between two tensors seen as flat vectors (NaN if either is zero)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return math.nan
    return math.degrees(math.acos(float((a @ b / (na * nb)).clamp(-1.0, 1.0))))


def _states(model: nn.Module):
    found = {n: layer_state(m) for n, m in model.named_modules() if layer_state(m) is not None}
    if not found:
        raise ValueError(f"{type(model).__name__} has no layer converted by hebbloss.feedback.convert()")
    return found


def feedback_angles(model: nn.Module) -> Dict[str, float]:
    """Per converted layer, the angle in degrees between its weight W and its feedback weight B."""
    return {n: angle(s.module.weight, s.mode.feedback(s.module)) for n, s in _states(model).items()}


def _input_grads(model, loss_fn, x, y, names) -> Dict[str, List[torch.Tensor]]:
    inputs: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    hooks = HookOwner()
    modules = dict(model.named_modules())
    for name in names:
        def keep(module, args, kwargs, name=name):
            t = args[0] if args else kwargs.get("input")
            if isinstance(t, torch.Tensor) and t.requires_grad:
                inputs[name].append(t)
        hooks.add(modules[name].register_forward_pre_hook(keep, with_kwargs=True, prepend=True))
    try:
        with torch.enable_grad():
            data = x.detach().requires_grad_(True) if x.is_floating_point() else x
            loss = loss_fn(model(data), y)
            flat = [t for n in names for t in inputs[n]]
            grads = torch.autograd.grad(loss, flat, allow_unused=True) if flat else ()
    finally:
        hooks.remove()
    out, i = {}, 0
    for n in names:
        out[n] = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads[i:i + len(inputs[n])], inputs[n])]
        i += len(inputs[n])
    return out


def input_gradient_angles(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y) -> Dict[str, float]:
    """Per converted layer, the angle in degrees between the gradient of ``loss_fn(model(x), y)``
    with respect to the layer's input as the feedback weights deliver it and as backprop would.

    Both passes see the same random state (dropout) and the model's buffers (BatchNorm statistics,
    redrawn magnitudes) and parameter gradients are left as they were.
    """
    states = _states(model)
    names = list(states)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
        try:
            fb = _input_grads(model, loss_fn, x, y, names)
            torch.set_rng_state(rng[0])
            for d, s in zip(devices, rng[1]):
                torch.cuda.set_rng_state(s, d)
            for s in states.values():
                s.active = False
            bp = _input_grads(model, loss_fn, x, y, names)
        finally:
            for s in states.values():
                s.active = True
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(buffers[k])
    result = {}
    for n in names:
        if not fb[n]:
            result[n] = math.nan  # the layer's input needs no gradient
            continue
        result[n] = angle(torch.cat([g.flatten() for g in fb[n]]), torch.cat([g.flatten() for g in bp[n]]))
    return result
