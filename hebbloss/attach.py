"""Make layers of any model plastic: during ``model(x)``, record each layer's surrogate term from its
output and post signal, and sum the terms into the loss of the rules (Miconi 2021).

    plastic = hebbloss.attach(model, rule="oja")
    model(x)
    plastic.loss().backward()     # gradients = minus the rule's updates
    optimizer.step()
    plastic.remove()              # the model is exactly as before

The model is never wrapped, renamed or given new state; the handle is an ``nn.Module`` whose
``state_dict`` holds the state of the post-synaptic signals (e.g. k-WTA thresholds).
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from . import distributed, layers, rules
from .competition import POSTS, post_signal
from ._hooks import HookHandle
from .selection import Targets, name_matches
from ._local import LocalTerm, at_once, local_loss, local_term, takes_sparse_product
from .validation import validate

_PLASTIC_LAYERS: "weakref.WeakKeyDictionary[nn.Module, Plasticity]" = weakref.WeakKeyDictionary()  # layer -> its live handle
Post = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class Record:
    """What one call of a plastic layer left: its output z, its surrogate term, and its post signal y.
    Under ``streaming=True``, and on the CPU where the update was taken at once and is finite, the output
    is let go in the forward (``output`` and ``local`` are None)."""

    output: Optional[torch.Tensor]
    term: LocalTerm
    local: Optional[torch.Tensor]  # the output the term's gradient starts from: ``output``, or its re-run on a detached input

    @property
    def post(self) -> Optional[torch.Tensor]:
        """y; None where the layer's Hebbian update was computed at once and y let go (where y is
        larger than the weight; see the private module ``hebbloss._local``)."""
        return self.term.post


def _post_key(name: str) -> str:
    return name.replace(".", "/") or "(model)"


class Plasticity(HookHandle, nn.Module):
    """Handle returned by :func:`attach`; see there. ``state_dict`` holds the post signals' state."""

    def __init__(self, model, chosen, rule_of, post_of, reduction, detach_input, streaming=False):
        super().__init__()
        self.reduction = reduction
        self.detach_input = detach_input
        self.streaming = streaming
        self.layers: Dict[str, nn.Module] = dict(chosen)
        self.rules: Dict[str, rules.Rule] = rule_of
        self.posts = nn.ModuleDict({_post_key(n): p for n, p in post_of.items() if isinstance(p, nn.Module)})
        self._post_fns: Dict[str, Post] = post_of
        self.records: Dict[str, List[Record]] = {n: [] for n in self.layers}
        self._kinds = {n: (layers.layer_type_of(m), layers.groups_of(m)) for n, m in self.layers.items()}
        self._model_name = type(model).__name__
        self._model = weakref.ref(model)  # for sync(): competition state may live in the model itself
        self._forward_start: Optional[Dict[str, int]] = None
        self._post_state: List[tuple] = []
        # streaming and purely local: the model's graph is recorded inside the plastic layers only
        self._local_graph = streaming and detach_input
        self._model_modes: List[tuple] = []  # (grad mode before model(x), depth of _layer_modes then)
        self._layer_modes: List[bool] = []   # grad mode before each plastic layer call now running
        self._hooks.forward_hook(model, self._begin_forward, pre=True)
        for name, module in self.layers.items():
            if detach_input:
                self._hooks.forward_hook(module, _detach_inputs, pre=True)
            if self._local_graph:  # first, so that a layer's own pre-hooks (pruning's W * mask) record too
                self._hooks.forward_hook(module, self._resume_graph, pre=True, prepend=True)
            self._hooks.forward_hook(module, self._make_hook(name))
            _PLASTIC_LAYERS[module] = self
        if self._local_graph:  # before everything, also on a model that is itself the plastic layer
            self._hooks.forward_hook(model, self._suspend_graph, pre=True, prepend=True)
        # after the layers' hooks, so that on a model that is itself the plastic layer they run last
        self._hooks.forward_hook(model, self._end_forward)
        self._hooks.forward_hook(model, self._undo_failed_forward, always_call=True)
        if self._local_graph:
            self._hooks.forward_hook(model, self._restore_graph, always_call=True)

    def _begin_forward(self, model, args):
        """Remember the record counts and the post signals' state (k-WTA thresholds), so that a
        forward pass that fails part-way leaves neither records nor moved thresholds behind."""
        self._forward_start = {n: len(r) for n, r in self.records.items()}
        recording = self._model_modes[-1][0] if self._model_modes else torch.is_grad_enabled()  # the caller's mode
        self._post_state = [(b, b.clone()) for b in self.posts.buffers()] if recording else []

    def _end_forward(self, model, args, output):
        self._forward_start, self._post_state = None, []

    def _undo_failed_forward(self, model, args, output):
        """Runs even when the forward raised (always_call); after a success _end_forward has cleared."""
        if self._forward_start is None:
            return
        for n, count in self._forward_start.items():
            del self.records[n][count:]
        with torch.no_grad():
            for buffer, saved in self._post_state:
                buffer.copy_(saved)
        self._forward_start, self._post_state = None, []

    def _suspend_graph(self, model, args):
        """Streaming, purely local: ``model(x)`` records no graph outside the plastic layers (what lies
        between them would only hold activations alive: no gradient of the rules passes through it)."""
        self._model_modes.append((torch.is_grad_enabled(), len(self._layer_modes)))
        torch.set_grad_enabled(False)

    def _resume_graph(self, module, args):
        """A plastic layer inside such a forward records its own graph (its weight's) again."""
        self._layer_modes.append(torch.is_grad_enabled())
        if self._model_modes and self._model_modes[-1][0]:
            torch.set_grad_enabled(True)

    def _restore_graph(self, model, args, output):
        """The grad mode of before ``model(x)``; runs also when the forward raised (always_call)."""
        if self._model_modes:
            mode, depth = self._model_modes.pop()
            del self._layer_modes[depth:]
            torch.set_grad_enabled(mode)

    def _make_hook(self, name: str):
        # Under torch.compile the hook runs eagerly (torch.compiler.disable): it is a graph break in any
        # case (autograd.grad, gradient edges, version checks), and traced, dynamo would specialise it on
        # each layer's name and recompile it per layer until its recompile limit (8 layers), then
        # give up on it. Measured on the Miconi network at batch 10 (CPU): compiled / eager 3.5x traced, 1.5x so.
        @torch.compiler.disable(recursive=True)
        def hook(module, args, output):
            if torch.is_grad_enabled():
                self.records[name].append(self._record(name, module, args, output))
            if self._local_graph:
                if self._layer_modes:  # back to the model's suspended recording
                    torch.set_grad_enabled(self._layer_modes.pop())
                return output.detach()  # nothing downstream keeps a graph back into the layer
        return hook

    def _record(self, name, module, args, output) -> Record:
        post_fn = self._post_fns[name]
        version = output._version
        with torch.no_grad():
            if isinstance(post_fn, nn.Module):
                post_fn.train(module.training)
            post = output.detach() if post_fn is None else post_fn(output.detach())
        if output._version != version:
            raise ValueError(
                f"the post signal of layer '{name}' modified the layer's output in place; pass a post that "
                "returns a new tensor (e.g. nn.ReLU() rather than nn.ReLU(inplace=True))"
            )
        if not isinstance(post, torch.Tensor) or post.shape != output.shape:
            shape = tuple(post.shape) if isinstance(post, torch.Tensor) else type(post).__name__
            raise ValueError(
                f"the post signal of layer '{name}' has shape {shape}, but the layer's output has shape "
                f"{tuple(output.shape)}; post must map the output to a tensor of the same shape"
            )
        kind, groups = self._kinds[name]
        adjoint = x = None
        sparse = False
        if len(args) == 1 and isinstance(args[0], torch.Tensor):
            x = args[0].detach()  # the family's weight-gradient product, in batch chunks, needs no graph
            adjoint = kind.adjoint(module, x, output)
            sparse = takes_sparse_product(adjoint, post, module.weight)
            if not at_once(module.weight, post, self.streaming, sparse, adjoint):
                adjoint = x = None
        local = output  # its graph reaches only the layer's weight and bias (its input is detached)
        if not self.detach_input and adjoint is None:  # the model's graph stays whole: re-run the layer on a detached input
            local = module.forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        term = local_term(module.weight, module.bias, kind, groups, local, post, self.rules[name], self.reduction,
                          streaming=self.streaming, adjoint=adjoint, x=x, sparse=sparse)
        if self.streaming:  # the update is taken: z, y and the layer's graph go now
            return Record(None, term, None)
        if term.edge is None and term.post is None and output.device.type == "cpu" and bool(torch.isfinite(term.correlation)):
            # taken at once (or frozen) and finite: nothing of hebbloss needs z or the layer's graph any more, and
            # letting them go now gives their memory to the next layers (SoftHebb, batch 64: a 5 % faster step).
            # A non-finite term keeps z, so that loss() can say where the NaN came from; on a GPU the check
            # would wait for the device, so z is kept there
            return Record(None, term, None)
        if term.post is not None and post.untyped_storage().data_ptr() == output.untyped_storage().data_ptr():
            term.post = post.clone()  # y waits for the backward: an in-place op after the layer must not change it
        return Record(output, term, local)

    def loss(self) -> torch.Tensor:
        """Sum of the surrogate terms recorded since the last call, which it clears.

        Raises (and clears nothing) when nothing was recorded or under ``torch.no_grad``. Raises
        FloatingPointError naming the layer, and drops the records (the next batch starts afresh),
        when the sum is NaN or Inf: it says whether the layer's weights, its input or its post
        signal held NaN or Inf. On the ``meta`` device nothing is checked.
        """
        if not torch.is_grad_enabled():
            raise RuntimeError("plastic.loss() was called under torch.no_grad(); call it where gradients are enabled")
        recorded = [r for recs in self.records.values() for r in recs]
        if not recorded:
            raise RuntimeError(
                f"no forward pass of {self._model_name} was recorded since the last loss(): run model(x) with "
                "gradients enabled (not under torch.no_grad() or torch.inference_mode()) before plastic.loss()"
            )
        total = local_loss([r.term for r in recorded], [r.local for r in recorded if r.term.edge is not None])
        if not total.is_meta and not torch.isfinite(total):  # a meta tensor has no value to check
            message = self._non_finite_message()
            self._clear_records()
            raise FloatingPointError(message)
        self._clear_records()
        return total

    def _clear_records(self) -> None:
        for recs in self.records.values():
            recs.clear()

    def _non_finite_message(self) -> str:
        """Which layer (in model order) first held NaN or Inf, and where: its weights, input or post signal."""
        advice = "lower the learning rate, normalise the input, or use a rule with decay (instar, oja)"
        for name, recs in self.records.items():
            for r in recs:
                bad = [p for p, t in (("weight", r.term.weight), ("bias", r.term.bias))
                       if t is not None and not torch.isfinite(t).all()]
                if bad:
                    return (f"layer '{name}' has NaN or Inf in its {' and '.join(bad)}: the weights diverged; "
                            f"{advice}, and start again from finite weights")
                if r.output is None and not torch.isfinite(r.term.correlation):  # streaming: z and y were let go
                    return (f"layer '{name}' produced NaN or Inf in its output or post signal: its input held NaN or "
                            f"Inf (the model input, or an earlier layer's output; check the batch), the product "
                            f"overflowed, or the post signal did; {advice}")
                if r.output is not None and not torch.isfinite(r.output).all():
                    return (f"layer '{name}' produced NaN or Inf in its output from a finite weight and bias: its "
                            "input held NaN or Inf (the model input, or an earlier layer's output; check the batch) "
                            f"or the product overflowed; {advice}")
                if r.post is not None and not torch.isfinite(r.post).all():
                    return f"layer '{name}' produced NaN or Inf in its post signal; {advice}"
                if r.post is None and not torch.isfinite(r.term.correlation):  # y was let go: <y, z> tells
                    return f"layer '{name}' produced NaN or Inf in its post signal (or its product with the output overflowed); {advice}"
        return "the surrogate loss overflowed to Inf; lower the learning rate or normalise the input"

    def sync(self, batch_size: Optional[float] = None) -> None:
        """Under data parallelism, make the competition state (k-WTA thresholds: every buffer named in a
        ``synced_buffers`` attribute of a post signal or of a module of the model) equal on all ranks of
        the default process group: its average over the ranks, weighted by each rank's ``batch_size``
        (equal weights when None). Called on every rank after each training forward pass, it gives
        exactly the state one process reaches on the global batch (the threshold update of Miconi 2021
        is linear in the batch's win rate; see :mod:`hebbloss.distributed`). A collective: every rank
        must call it. No-op when ``torch.distributed`` is not initialised or has one rank."""
        model = self._model()
        distributed.sync_buffers(distributed.synced_buffers(self, *([model] if model is not None else [])), batch_size)

    def plastic_parameters(self) -> List[nn.Parameter]:
        """The weights and biases the rules update (pass them to an optimizer)."""
        return [p for m in self.layers.values() for p in layers.plastic_parameters(m)]

    def remove(self) -> None:
        """Take every hook off and forget the records: the model is exactly as before attach().
        May be called twice; ``with hebbloss.attach(...) as plastic:`` calls it on exit."""
        super().remove()
        for module in self.layers.values():
            if _PLASTIC_LAYERS.get(module) is self:  # not a later handle's layer
                del _PLASTIC_LAYERS[module]
        self._clear_records()

    def extra_repr(self) -> str:
        return "\n".join(f"{n or '(model)'}: {type(m).__name__}, rule={self.rules[n]!r}" for n, m in self.layers.items())


def _detach_inputs(module, args):
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def _check_post(post: Post, argument: str) -> None:
    """A post signal is None, a callable, or a name :func:`hebbloss.competition.post_signal` knows."""
    if isinstance(post, str):
        try:
            post_signal(post)
        except ValueError as e:
            raise ValueError(f"{argument} {e}") from None
    elif post is not None and not callable(post):
        raise TypeError(
            f"{argument} must be None, a callable mapping a layer's output to its post signal, or a name "
            f"({', '.join(POSTS)}), got {type(post).__name__}"
        )


def _copy_post(post: Post, name: str, module: nn.Module) -> Post:
    """The layer's own post signal: a name resolved with the layer's channel axis, a stateful post
    module copied and bound to the layer's number of units."""
    kind = layers.layer_type_of(module)
    if isinstance(post, str):
        post = post_signal(post, channel_dim=-1 - kind.spatial_dims)  # from the end: batched or not
    if not isinstance(post, nn.Module):
        return post
    post = copy.deepcopy(post)
    if hasattr(post, "bind"):
        try:
            post.bind(kind.num_units(layers.plastic_weight(module), layers.groups_of(module)))
        except ValueError as e:
            raise ValueError(f"layer '{name or '(model)'}': {e}") from None
    return post


def attach(
    model: nn.Module,
    rule: Union[str, rules.Rule] = "hebb",
    post: Post = None,
    targets: Targets = None,
    overrides: Optional[Mapping[str, Mapping[str, object]]] = None,
    reduction: str = "sum",
    detach_input: bool = True,
    streaming: bool = False,
) -> Plasticity:
    """Make the chosen layers of ``model`` plastic under ``rule`` and return the handle.

    rule: a rule name or :class:`hebbloss.rules.Rule` for every chosen layer.
    post: callable mapping a layer's output z to its post signal y (default: y = z), or its name
        (``"relu"``, ``"kwta:4"``, ...: see :func:`hebbloss.competition.post_signal`; the channel axis
        is the layer's). A stateful ``nn.Module`` is copied for each layer (and ``bind(num_units)``
        is called on the copy).
    targets: which layers (see :mod:`hebbloss.selection`); default every supported layer.
    overrides: ``{pattern: {"rule": ..., "post": ...}}`` per layer name (same matching as targets;
        later patterns win).
    reduction: "sum" (the rule's update) or "mean" (divided by samples x positions).
    detach_input: True (default) feeds each plastic layer a detached input, so no gradient - neither
        a surrogate's nor a task loss's - passes a plastic layer back to earlier ones, and backward
        skips input gradients. False keeps the model's graph whole for mixing with backprop; each
        surrogate is then computed on a re-run of its layer on the detached input (one extra forward).
    streaming: False (default) keeps each layer's graph or post signal until :meth:`Plasticity.loss`.
        True takes each layer's update (sum y x, by the family's weight-gradient product over batch
        chunks of a few MiB of y) in its forward hook and lets its output, post signal and graph go
        at once, so activations are freed layer by layer; ``loss()`` has the same value and gradients
        (up to float rounding). For purely local training: with ``detach_input=True`` the forward of
        the model records no graph outside the plastic layers (it runs as under ``torch.no_grad()``
        there, BatchNorm statistics still move) and each plastic layer's output is passed on
        detached, so peak memory is near inference's, and no task loss trains anything (the output
        has no graph; non-plastic parameters get no gradient). With ``detach_input=False`` the
        model's own graph is kept as usual, for mixing with backprop. Streaming is opt-in, not
        automatic: it changes what the forward leaves (no graph for a task loss on a head, no ``z``
        or ``y`` in :attr:`Plasticity.records`), which code written for the default may rely on.
    Every check runs before any hook is placed; :func:`hebbloss.validate` lists the layers first.
    """
    chosen = list(validate(model, targets, rule, strict=True).modules.items())
    rule_obj = rules.get(rule)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    _check_post(post, "post")
    again = [n or "(model)" for n, m in chosen if m in _PLASTIC_LAYERS]
    if again:
        raise ValueError(
            f"layers {', '.join(again)} are already plastic under another hebbloss.attach(); "
            "call .remove() on that handle first"
        )
    rule_of = {n: rule_obj for n, _ in chosen}
    post_of = {n: post for n, _ in chosen}
    for pattern, settings in (overrides or {}).items():
        unknown = set(settings) - {"rule", "post"}
        if unknown:
            raise ValueError(f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}; allowed: 'rule', 'post'")
        _check_post(settings.get("post"), f"overrides[{pattern!r}]['post']")
        hit = [n for n, _ in chosen if name_matches(pattern, n)]
        if not hit:
            raise ValueError(f"overrides pattern {pattern!r} matches none of the plastic layers: {', '.join(n for n, _ in chosen)}")
        for n in hit:
            if "rule" in settings:
                rule_of[n] = rules.get(settings["rule"])
            if "post" in settings:
                post_of[n] = settings["post"]
    post_of = {n: _copy_post(post_of[n], n, m) for n, m in chosen}
    return Plasticity(model, chosen, rule_of, post_of, reduction, detach_input, bool(streaming))
