"""Train any model without weight symmetry: each chosen layer's backward uses feedback weights B
for its input gradient, while its weight gradient stays delta * x^T (Lillicrap et al. 2016;
Liao et al. 2016; Moskovitz, Litwin-Kumar & Abbott 2018; Amit 2019; Akrout et al. 2019).

    fb = hebbloss.feedback.convert(model, "fa")      # or bp, usf, frsf, brsf, urfb, kp
    loss_fn(model(x), y).backward(); optimizer.step()
    fb.remove()                                      # the model is exactly as before

Design (one forward, no copies, any forward that is linear in W):
1. a forward pre-hook keeps the layer's input x and hands the layer ``x.detach()``; the layer's
   own forward (its padding mode, timm's dynamic "SAME" padding, pruning masks, autocast) then
   builds a graph to W and b only, so autograd computes the weight and bias gradients exactly as
   in backprop and skips the input gradient;
2. a forward hook returns the layer's output through ``_FeedbackGrad``, an autograd.Function whose
   forward is the identity (a detached alias, so later in-place ops such as ReLU(inplace=True) stay
   legal) and whose backward passes delta on to the layer's graph and returns the input gradient
   computed with B (the adjoint that the layer's family declares in :mod:`hebbloss.layers`);
3. where B trains (urfb, kp), W and B get the same product delta * x^T: the forward hook returns the
   output through ``_SharedProduct`` instead, whose backward computes that product once for both (and
   b's gradient, sum delta), adds the Kolen-Pollack decay terms, and has no edge to the layer's graph,
   which is let go in the forward and never runs.
The cost is that of backprop: the input gradient with B in place of the one with W.
The model keeps its module instances and state_dict keys; B (or its magnitude M) is added to each
layer as a persistent entry ``feedback_weight`` (buffer, or Parameter for urfb/kp),
``feedback_magnitude`` (buffer) or ``feedback_scale`` (usf: a 0-dim buffer), and ``remove()`` deletes it again.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Dict, Iterator, List, Optional, Union

import torch
from torch import nn

from .. import layers
from .._hooks import HookHandle
from ..selection import Targets
from ..validation import validate
from . import modes

_CONVERTED: "weakref.WeakKeyDictionary[nn.Module, _Layer]" = weakref.WeakKeyDictionary()


class _FeedbackGrad(torch.autograd.Function):
    """Identity on the layer's output; backward: input gradient with B, B's gradient delta x^T."""

    @staticmethod
    def forward(ctx, output, x, weight, feedback, adj, decay):
        ctx.adj, ctx.decay = adj, decay
        ctx.save_for_backward(x, weight, feedback)
        return output.detach()  # an alias, not a view: later in-place ops stay legal

    @staticmethod
    def backward(ctx, delta):
        x, weight, feedback = ctx.saved_tensors
        grad_x = ctx.adj.input_grad(delta, x, feedback) if ctx.needs_input_grad[1] else None
        grad_w = ctx.decay * weight if ctx.needs_input_grad[2] else None
        grad_b = None
        if ctx.needs_input_grad[3]:
            grad_b = ctx.adj.weight_grad(delta, x, feedback)
            if ctx.decay:
                grad_b = grad_b + ctx.decay * feedback
        return delta, grad_x, grad_w, grad_b, None, None


class _SharedProduct(torch.autograd.Function):
    """Identity on the layer's output, for trainable B (urfb, kp); backward: the input gradient with B,
    the product G = delta x^T once as the gradient of both W and B (plus decay * W and decay * B), and
    b's gradient, delta summed over every dimension but the bias's. Nothing reaches the layer's graph."""

    @staticmethod
    def forward(ctx, output, x, weight, bias, feedback, adj, decay, bias_dim):
        ctx.adj, ctx.decay, ctx.bias_dim = adj, decay, bias_dim
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, feedback)
        return output.detach()  # an alias, not a view: later in-place ops stay legal

    @staticmethod
    def backward(ctx, delta):
        x, weight, feedback = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = ctx.adj.input_grad(delta, x, feedback) if needs[1] else None
        product = ctx.adj.weight_grad(delta, x, feedback) if needs[2] or needs[4] else None
        grad_w = grad_b = grad_bias = None
        if needs[2]:  # one tensor for both is fine: autograd stores a grad it cannot steal as a copy
            grad_w = product + ctx.decay * weight if ctx.decay else product
        if needs[4]:
            grad_b = product + ctx.decay * feedback if ctx.decay else product
        if needs[3]:
            first, count = ctx.bias_dim
            dims = [d for d in range(delta.dim()) if not first <= d < first + count]
            grad_bias = delta.sum(dim=dims, dtype=ctx.bias_dtype) if dims else delta.to(ctx.bias_dtype, copy=True)
        return None, grad_x, grad_w, grad_bias, grad_b, None, None, None


def _bias_dims(bias: Optional[torch.Tensor], output: torch.Tensor, unit_dim: int):
    """(first, count): the dimensions of ``output`` that ``bias`` spans, from the units' dimension on (a
    conv's b_c: (1, 1); an untied layer's b_{c,i,j}: (1, 3)), or None where its shape does not line up."""
    if bias is None:
        return 0, 0
    unit_dim %= max(output.dim(), 1)
    if tuple(output.shape[unit_dim:unit_dim + bias.dim()]) != tuple(bias.shape):
        return None
    return unit_dim, bias.dim()


class _Layer:
    """One converted layer: its mode, its decay and the input of the call under way."""

    def __init__(self, name: str, module: nn.Module, mode: modes.Mode, decay: float, generator):
        self.name, self.module, self.mode, self.decay, self.generator = name, module, mode, decay, generator
        self.kind = layers.layer_type_of(module, "feedback")
        self.x: Optional[torch.Tensor] = None
        self.active = True
        self.hooks: tuple = ()  # this layer's two RemovableHandles, placed by its Feedback handle

    def adjoint_for(self, x: torch.Tensor, output: torch.Tensor) -> layers.Adjoint:
        return self.kind.adjoint(self.module, x, output)

    def pre_hook(self, module, args, kwargs):
        self.x = None
        if not self.active or not torch.is_grad_enabled():
            return None
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return None
        if self.mode.redraw and module.training:
            with torch.no_grad():
                entry = getattr(module, self.mode.entry)
                entry.copy_(modes.random_like(module.weight, self.generator))
        self.x = x
        if not x.requires_grad:
            return None
        if args:
            return (x.detach(),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "input": x.detach()}

    def forward_hook(self, module, args, kwargs, output):
        x, self.x = self.x, None
        if x is None or not isinstance(output, torch.Tensor):
            return None
        feedback = self.mode.feedback(module)
        trains_b = self.mode.trainable and feedback.requires_grad
        if not (x.requires_grad or trains_b):
            return None
        adjoint = self.adjoint_for(x, output)
        bias = getattr(module, "bias", None)
        bias_dim = _bias_dims(bias, output, self.kind.channel_dim(output)) if trains_b else None
        if bias_dim is not None:  # output enters detached: no edge keeps the layer's graph (an untied layer's
            # input patches) alive until the backward, which would never use it
            return _SharedProduct.apply(output.detach(), x, module.weight, bias, feedback, adjoint, self.decay, bias_dim)
        weight = module.weight if self.mode.decays else None
        return _FeedbackGrad.apply(output, x, weight, feedback, adjoint, self.decay)


class Feedback(HookHandle):
    """Handle returned by :func:`convert`: the converted layers, their B, and ``remove()``."""

    def __init__(self, model: nn.Module, mode: modes.Mode, chosen: Dict[str, _Layer]):
        super().__init__()
        for state in chosen.values():
            state.owner = self  # carry_over() reaches the handle from the layer
        self.mode = mode
        self._model_name = type(model).__name__
        self._layers = chosen
        for state in chosen.values():
            self._place(state)

    def _place(self, state: _Layer) -> None:
        state.hooks = (self._hooks.forward_hook(state.module, state.pre_hook, pre=True, with_kwargs=True),
                       self._hooks.forward_hook(state.module, state.forward_hook, with_kwargs=True))

    def _move(self, state: _Layer, new: nn.Module, entry: Optional[torch.Tensor]) -> None:
        """Carry ``state`` from its module to ``new`` (see :func:`carry_over`)."""
        old = state.module
        for hook in state.hooks:
            hook.remove()
        if self.mode.entry is not None:
            _add_entry(new, self.mode, entry)
            delattr(old, self.mode.entry)
        del _CONVERTED[old]
        state.module, state.kind, state.x = new, layers.layer_type_of(new, "feedback"), None
        _CONVERTED[new] = state
        self._place(state)

    @property
    def layers(self) -> Dict[str, nn.Module]:
        """The converted layers by qualified name."""
        return {n: s.module for n, s in self._layers.items()}

    def feedback_weight(self, name: str) -> torch.Tensor:
        """The feedback weight B that layer ``name`` uses now (detached)."""
        if name not in self._layers:
            raise KeyError(f"layer {name!r} is not converted; converted layers: {', '.join(self._layers)}")
        return self.mode.feedback(self._layers[name].module).detach()

    def feedback_parameters(self) -> List[nn.Parameter]:
        """The trainable feedback weights (urfb, kp); already among ``model.parameters()``."""
        if not self.mode.trainable:
            return []
        return [getattr(s.module, modes.FEEDBACK_WEIGHT) for s in self._layers.values()]

    @contextlib.contextmanager
    def disabled(self) -> Iterator["Feedback"]:
        """Within this block the converted layers run plain backprop (their original code path)."""
        for s in self._layers.values():
            s.active = False
        try:
            yield self
        finally:
            for s in self._layers.values():
                s.active = True

    def remove(self) -> None:
        """Take every hook and feedback entry off: the model is exactly as before convert().
        May be called twice; ``with hebbloss.feedback.convert(...) as fb:`` calls it on exit."""
        super().remove()
        for state in self._layers.values():
            if self.mode.entry is not None and _CONVERTED.get(state.module) is state:
                delattr(state.module, self.mode.entry)
            if _CONVERTED.get(state.module) is state:
                del _CONVERTED[state.module]

    def __repr__(self) -> str:
        return f"Feedback(mode={self.mode.name!r}, model={self._model_name}, layers={list(self._layers)})"


def _in_use(module: nn.Module) -> Optional[str]:
    """Why a layer that can be converted cannot be now: it is converted already, or has our attribute."""
    if module in _CONVERTED:
        return "already converted by hebbloss.feedback.convert(); call .remove() on that handle first"
    clash = [n for n in (modes.FEEDBACK_WEIGHT, modes.FEEDBACK_MAGNITUDE, modes.FEEDBACK_SCALE) if hasattr(module, n)]
    if clash:
        return f"{type(module).__name__} already has an attribute {clash[0]!r}, which convert() would add"
    return None


def convert(
    model: nn.Module,
    mode: Union[str, modes.Mode],
    targets: Targets = None,
    *,
    init: Optional[modes.Init] = None,
    weight_decay: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Feedback:
    """Make the chosen layers of ``model`` learn with feedback weights B instead of W^T.

    mode: "bp", "fa", "usf", "frsf", "brsf", "urfb" or "kp" (see :mod:`hebbloss.feedback.modes`).
    targets: which layers (see :mod:`hebbloss.selection`); default every layer of a registered family
        (:mod:`hebbloss.layers`: Linear, Conv*d, ConvTranspose*d, LocallyConnected2d, timm's Conv2dSame).
    init: initial B (fa, urfb, kp) or M (frsf, brsf): "random" (N(0, std W), the default), "weight"
        (a copy of W: urfb/kp then reproduce backprop) or a callable(weight) -> tensor; for usf the
        fixed scale s of B = s * sign(W): "std" (W's standard deviation now, the default), "xavier",
        "kaiming", a number or a callable(weight) -> number (:func:`hebbloss.feedback.modes.usf_scale`).
    weight_decay: Kolen-Pollack decay on W and B, added to their gradients (kp only; default 1e-3).
        Keep the optimizer's own weight decay off W and B then (:func:`hebbloss.feedback.param_groups`),
        or W decays faster than B and W - B no longer shrinks.
    generator: torch.Generator for the random draws (default: torch's global RNG).
    For urfb/kp, B is a new Parameter: build the optimizer after convert() (or add
    ``handle.feedback_parameters()`` to it). Every check runs before the model is changed.
    """
    mode_obj = modes.get(mode)
    if weight_decay is not None and not mode_obj.decays:
        raise ValueError(f"weight_decay is the Kolen-Pollack decay of mode 'kp'; mode {mode_obj.name!r} takes none")
    decay = 1e-3 if weight_decay is None and mode_obj.decays else float(weight_decay or 0.0)
    if decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    report = validate(model, targets, purpose="feedback")
    for name, module in list(report.modules.items()):
        reason = _in_use(module)
        if reason is not None:
            report.refuse(name, reason)
    chosen = list(report.raise_if_invalid().modules.items())
    entries = {}
    if mode_obj.entry is not None:
        for name, module in chosen:
            entries[name] = modes.initial_entry(mode_obj, module.weight, init, generator)
    states = {name: _Layer(name, module, mode_obj, decay, generator) for name, module in chosen}
    for name, module in chosen:  # nothing was changed before this line
        if name in entries:
            _add_entry(module, mode_obj, entries[name])
        _CONVERTED[module] = states[name]
    return Feedback(model, mode_obj, states)  # places the hooks


def _add_entry(module: nn.Module, mode: modes.Mode, value: torch.Tensor) -> None:
    """Give ``module`` the mode's persistent entry (B or M): a Parameter when B trains (urfb, kp), else a buffer."""
    if mode.trainable:
        module.register_parameter(mode.entry, nn.Parameter(value))
    else:
        module.register_buffer(mode.entry, value, persistent=True)


def converted_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The layers of ``model`` that a live :func:`convert` handle has converted, by name."""
    return {n: m for n, m in model.named_modules() if m in _CONVERTED}


def layer_state(module: nn.Module) -> Optional[_Layer]:
    """The live conversion of ``module`` (its mode, decay and activity), or None when not converted."""
    return _CONVERTED.get(module)


def carry_over(old: nn.Module, new: nn.Module, entry: Optional[torch.Tensor] = None) -> bool:
    """Move the live conversion of layer ``old`` to layer ``new``, which replaces it in the model
    (as :func:`hebbloss.feedback.untie` does): the same handle, mode and decay now act on ``new``,
    with ``entry`` as its feedback weight B (or magnitude M) when the mode stores one; ``old`` is
    left as before :func:`convert`. Returns False (and changes nothing) when ``old`` is not converted.
    A trainable B (urfb, kp) becomes a new Parameter: build the optimizer after the replacement.
    """
    state = _CONVERTED.get(old)
    if state is None:
        return False
    owner = state.owner
    reason = layers.why_unsupported(new, "feedback")
    if reason is not None:
        raise ValueError(f"cannot carry the feedback of {type(old).__name__} over: {reason}")
    if state.mode.entry is not None:
        weight = new.weight
        shape = () if state.mode.entry == modes.FEEDBACK_SCALE else tuple(weight.shape)
        if entry is None or tuple(entry.shape) != shape:
            got = "none" if entry is None else tuple(entry.shape)
            raise ValueError(f"mode {state.mode.name!r} needs a {state.mode.entry} of shape {shape} "
                             f"(the new layer's weight shape, or () for a scale), got {got}")
        entry = entry.detach().to(device=weight.device, dtype=weight.dtype).clone()
    owner._move(state, new, entry)
    return True
