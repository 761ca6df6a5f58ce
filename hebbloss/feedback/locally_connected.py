"""Untied (locally connected) 2-d convolution: a separate filter at every output position.

Amit (2019, "Deep learning with asymmetric connections and Hebbian updates") shows that such
untied layers, which need no weight sharing (biologically implausible), learn as well as
convolutions under asymmetric feedback. ``LocallyConnected2d.from_conv`` copies a Conv2d's filter
to every position (same output), and :func:`untie` replaces a model's Conv2d layers in place. The
math (:func:`local_conv2d` and its backward) is in :mod:`hebbloss.layers.locally_connected`.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .. import layers
from ..layers.locally_connected import local_conv2d
from .._hooks import HookOwner
from .convert import carry_over, layer_state
from ..selection import Targets, select_layers

Pair = Union[int, Tuple[int, int]]


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


class LocallyConnected2d(nn.Module):
    """A Conv2d whose filter differs at each of the out_h x out_w output positions (untied weights).

    weight: [out_h, out_w, out_channels, in_channels // groups, kh, kw]; bias: [out_channels, out_h, out_w].
    Only inputs of spatial size ``input_size`` are accepted.
    """

    def __init__(self, in_channels: int, out_channels: int, input_size: Pair, kernel_size: Pair,
                 stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1, groups: int = 1, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.input_size, self.kernel_size = _pair(input_size), _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.output_size = tuple(
            _out_size(self.input_size[i], self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i]) for i in range(2)
        )
        if min(self.output_size) < 1:
            raise ValueError(f"input_size {self.input_size} is too small for kernel {self.kernel_size} (output {self.output_size})")
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(*self.output_size, out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, *self.output_size, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, as torch's Conv2d."""
        bound = 1.0 / math.sqrt(self.weight[0, 0, 0].numel())
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or tuple(input.shape[-2:]) != self.input_size or input.shape[1] != self.in_channels:
            raise ValueError(
                f"LocallyConnected2d expects input [N, {self.in_channels}, {self.input_size[0]}, {self.input_size[1]}] "
                f"(weights are per position), got {tuple(input.shape)}"
            )
        return local_conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, input_size: Pair) -> "LocallyConnected2d":
        """The untied layer computing exactly ``conv``'s output on inputs of size ``input_size`` (H, W)."""
        reason = _reason_not_untieable(conv)
        if reason is not None:
            raise ValueError(f"cannot untie {type(conv).__name__}: {reason}")
        lc = cls(conv.in_channels, conv.out_channels, input_size, conv.kernel_size, conv.stride,
                 _numeric_padding(conv), conv.dilation, conv.groups, conv.bias is not None,
                 device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            lc.weight.copy_(conv.weight.detach().expand(*lc.output_size, *conv.weight.shape))
            if conv.bias is not None:
                lc.bias.copy_(conv.bias.detach()[:, None, None].expand_as(lc.bias))
        return lc

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, input_size={self.input_size}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}")


def _numeric_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    if isinstance(conv.padding, str):
        pads = conv._reversed_padding_repeated_twice  # [left_w, right_w, left_h, right_h]
        return (pads[2], pads[0])
    return tuple(conv.padding)


def _reason_not_untieable(module: nn.Module) -> Optional[str]:
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not a Conv2d"
    reason = layers.why_unsupported(module)
    if reason is not None:
        return reason
    if type(module).forward is not nn.Conv2d.forward:
        return f"{type(module).__name__} pads its input dynamically; only nn.Conv2d with static padding can be untied"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}; only zero padding can be untied"
    if isinstance(module.padding, str):
        pads = module._reversed_padding_repeated_twice
        if pads[0] != pads[1] or pads[2] != pads[3]:
            return "padding='same' with an even kernel pads asymmetrically, which cannot be untied"
    return None


def untie(model: nn.Module, input_size: Sequence[int], targets: Targets = None) -> Dict[str, LocallyConnected2d]:
    """Replace the chosen Conv2d layers of ``model`` by equal :class:`LocallyConnected2d` layers.

    input_size: the shape of one model input without the batch dimension, e.g. (3, 32, 32); a
    forward pass on zeros of that shape (no_grad, eval mode, then the modes are restored) finds
    each layer's input size. State_dict keys stay the same (``weight``/``bias``; shapes grow).
    A layer converted by :func:`hebbloss.feedback.convert` stays converted: its handle, mode and
    decay carry over, and its feedback weight B (or magnitude M) is replicated at every output
    position, so the untied network starts as the tied one, also in its backward pass (Amit 2019
    converts a trained convolution to untied layers in the same way). Build the optimizer after
    untie(): the weights (and a trainable B) are new Parameters.
    Returns the new layers by name. Every check runs before the model is changed.
    """
    chosen = select_layers(model, (lambda n, m: isinstance(m, nn.Conv2d)) if targets is None else targets,
                           supported=_reason_not_untieable, purpose="untied")
    if any(name == "" for name, _ in chosen):
        raise ValueError("untie() replaces layers inside a model; for a lone Conv2d use LocallyConnected2d.from_conv(conv, input_size)")
    sizes: Dict[str, set] = {name: set() for name, _ in chosen}
    hooks = HookOwner()
    for name, module in chosen:
        hooks.add(module.register_forward_pre_hook(lambda m, args, name=name: sizes[name].add(tuple(args[0].shape[-2:]))))
    training = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    probe = torch.zeros(1, *input_size, device=param.device if param is not None else None,
                        dtype=param.dtype if param is not None and param.is_floating_point() else None)
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    finally:
        hooks.remove()
        for m, flag in training.items():
            m.training = flag
    bad = {n: s for n, s in sizes.items() if len(s) != 1}
    if bad:
        lines = ", ".join(f"{n} ({'never called' if not s else 'called with sizes ' + str(sorted(s))})" for n, s in bad.items())
        raise ValueError(f"cannot untie layers with no single input size on input {tuple(input_size)}: {lines}")
    new = {name: LocallyConnected2d.from_conv(module, next(iter(sizes[name]))) for name, module in chosen}
    entries = {name: _replicated_entry(module, new[name]) for name, module in chosen}
    for name, lc in new.items():
        parent_name, _, child = name.rpartition(".")
        old = dict(chosen)[name]
        lc.train(old.training)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lc)
        carry_over(old, lc, entries[name])
    return new


def _replicated_entry(conv: nn.Conv2d, lc: LocallyConnected2d) -> Optional[torch.Tensor]:
    """The converted ``conv``'s feedback weight B (or magnitude M) at every output position of ``lc``."""
    state = layer_state(conv)
    if state is None or state.mode.entry is None:
        return None
    entry = getattr(conv, state.mode.entry).detach()
    if entry.dim() == 0:  # usf's fixed scale: one number for the layer
        return entry.clone()
    return entry.expand(*lc.output_size, *entry.shape).clone()
