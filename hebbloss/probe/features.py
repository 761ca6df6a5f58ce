"""Capture pooled features of named layers of any model with removable forward hooks.

The model runs in eval mode under ``torch.no_grad`` (so hebbloss plasticity records nothing and
k-WTA thresholds do not move); every module's train/eval mode is restored afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import layers as layer_registry
from ..data.batching import batches
from .._hooks import HookOwner
from ..selection import Targets, name_matches, select_layers
from .pooling import Pool, check_pool, pool_features

INPUT = "input"  # the name under which the images themselves can be probed


def _listing(model: nn.Module) -> str:
    names = [n for n, _ in model.named_modules() if n]
    info = getattr(model, "feature_info", None)
    timm_names = [f.get("module") for f in info] if isinstance(info, list) else []
    head = f"its timm feature stages are: {', '.join(timm_names)}; " if timm_names else ""
    shown = ", ".join(names[:80]) + (f", ... ({len(names) - 80} more)" if len(names) > 80 else "")
    return f"{head}its modules are: {shown or 'none'} (and '{INPUT}' for the images themselves)"


def resolve_layers(model: nn.Module, layers: Targets) -> List[Tuple[str, Optional[nn.Module]]]:
    """The (name, module) pairs chosen by ``layers`` in model order ("input" gives (input, None)).

    ``layers`` uses hebbloss.select_layers' rules (names, suffixes, globs, regexes, types, predicates);
    None chooses the timm feature stages when the model has ``feature_info``, else every Linear/Conv.
    Each string must match something: otherwise ValueError listing the model's modules.
    """
    if layers is None:
        info = getattr(model, "feature_info", None)
        if isinstance(info, list) and info and all("module" in f for f in info):
            stages = {f["module"] for f in info}
            layers = lambda name, module: name in stages  # exact names: "act1" must not match "layer1.0.act1"
    items = [layers] if isinstance(layers, (str, type)) or callable(layers) else (list(layers) if layers is not None else None)
    want_input = items is not None and INPUT in items
    if items is not None:
        items = [t for t in items if t != INPUT]
        names = [n for n, _ in model.named_modules()]
        unknown = [t for t in items if isinstance(t, str) and not any(name_matches(t, n) for n in names)]
        if unknown:
            raise ValueError(f"layers {unknown} match no module of {type(model).__name__}; {_listing(model)}")
    chosen: List[Tuple[str, Optional[nn.Module]]] = [(INPUT, None)] if want_input else []
    if items is None or items:
        try:
            chosen += select_layers(model, items, supported=lambda m: None, purpose="probed")
        except ValueError as e:
            raise ValueError(f"{e}\n{_listing(model)}") from None
    if not chosen:
        raise ValueError(f"no layer to probe was given; {_listing(model)}")
    return chosen


def timm_stage_indices(model: nn.Module, chosen: Sequence[Tuple[str, Optional[nn.Module]]]) -> Optional[List[int]]:
    """Positions in timm's ``feature_info`` of the chosen layers when all of them are timm feature stages
    of a model with ``forward_intermediates`` (which returns NCHW maps, also for ViT tokens), else None."""
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") or not isinstance(info, list):
        return None
    position = {f.get("module"): i for i, f in enumerate(info)}
    names = [n for n, m in chosen if m is not None]
    if not names or not all(n in position for n in names):
        return None
    return [position[n] for n in names]


def _channel_dim(module: Optional[nn.Module], output: torch.Tensor) -> int:
    """Where the channels of ``output`` are: the layer registry knows Linear (last) and Conv (1)."""
    if module is not None and layer_registry.why_unsupported(module) is None:
        return layer_registry.layer_type_of(module).channel_dim(output)
    return 1


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every module of ``model`` in eval mode, and restore each one's own mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def iter_features(
    model: nn.Module,
    chosen: Sequence[Tuple[str, Optional[nn.Module]]],
    images: torch.Tensor,
    batch_size: int = 256,
    pool: Pool = "quadrants",
    device: Optional[Union[str, torch.device]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    channel_dim: Optional[int] = None,
    use_timm: bool = True,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Per batch of ``images`` (in order), the pooled output [B, D] of each chosen layer, on ``device``.

    Only pooled features are kept, so memory does not grow with the size of the feature maps. When every
    chosen layer is a timm feature stage, timm's ``forward_intermediates`` gives the maps (NCHW, also for
    ViTs, whose tokens hooks would see as [N, T, D]); otherwise forward hooks do.
    """
    check_pool(pool)
    device = torch.device(device) if device is not None else model_device(model)
    hooks, current = HookOwner(), {}
    stages = timm_stage_indices(model, chosen) if use_timm else None

    def make_hook(name, module):
        def hook(mod, args, output):
            if name in current:
                raise RuntimeError(f"layer '{name}' ran twice in one forward pass of {type(model).__name__}; probe a layer that runs once")
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer '{name}' returned {type(output).__name__}, not a tensor; probe another layer")
            cd = channel_dim if channel_dim is not None else _channel_dim(module, output)
            current[name] = pool_features(output.detach(), pool, cd).float()
        return hook

    try:
        for name, module in chosen:
            if module is not None and stages is None:
                hooks.forward_hook(module, make_hook(name, module))
        labels = torch.zeros(images.shape[0], dtype=torch.int64)
        with eval_mode(model), torch.no_grad():
            for x, _ in batches(images, labels, batch_size, device=device, mean=mean, std=std):
                current.clear()
                if any(m is None for _, m in chosen):
                    current[INPUT] = pool_features(x, pool, 1)
                if stages is None:
                    model(x)
                else:
                    maps = model.forward_intermediates(x, indices=stages, intermediates_only=True)
                    for (n, _), m in zip([c for c in chosen if c[1] is not None], maps):
                        current[n] = pool_features(m, pool, 1).float()
                missing = [n for n, _ in chosen if n not in current]
                if missing:
                    raise RuntimeError(f"layers {missing} did not run in the forward pass of {type(model).__name__}; probe layers it uses")
                yield {n: current[n] for n, _ in chosen}
    finally:
        hooks.remove()
        current.clear()


def capture_features(
    model: nn.Module,
    layers: Targets,
    images: torch.Tensor,
    batch_size: int = 256,
    pool: Pool = "quadrants",
    device: Optional[Union[str, torch.device]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    channel_dim: Optional[int] = None,
    out_device: Optional[Union[str, torch.device]] = "cpu",
    use_timm: bool = True,
) -> Dict[str, torch.Tensor]:
    """The pooled features [N, D] (float32, on ``out_device``) of each layer chosen by ``layers`` for
    ``images`` (uint8 scaled to [0, 1], or float; then ``(x - mean) / std`` per channel when given).

    ``layers`` follows hebbloss.select_layers (names, globs, regexes, types; "input" adds the images
    themselves); ``device`` defaults to the model's (the model is not moved). The model runs in eval
    mode under no_grad with removable hooks, all taken off and every module's mode restored afterwards.
    Channels are dim 1, except for Linear layers (last) or as ``channel_dim`` says. With ``use_timm``,
    timm feature stages are read with ``forward_intermediates`` (see :func:`iter_features`).
    """
    chosen = resolve_layers(model, layers)
    parts: Dict[str, List[torch.Tensor]] = {n: [] for n, _ in chosen}
    for feats in iter_features(model, chosen, images, batch_size, pool, device, mean, std, channel_dim, use_timm):
        for n, f in feats.items():
            parts[n].append(f.to(out_device) if out_device is not None else f)
    return {n: torch.cat(p) for n, p in parts.items()}
