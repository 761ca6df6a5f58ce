"""The surrogate terms of every plastic layer of a model as one autograd node (Miconi 2021).

:func:`hebbloss.attach` feeds each plastic layer a detached input, so the graph of a layer's output
reaches only that layer's weight and bias. :func:`local_loss` therefore sums the recorded terms

    L = sum_r  scale_r * ( -<y_r, z_r> + 1/2 * sum_c S_rc (||W_c||^2 + b_c^2) )

in one node whose backward runs all the layers' own backwards (the framework's weight-gradient
kernels, ``convolution_backward`` or ``mm``) in a single ``torch.autograd.grad`` call fed with the
post signals y, then adds each unit's decay S_c W_c to the fresh weight gradient in place. The
gradients are those of the plain expression; per layer this saves an autograd node, a Python
backward and a re-entry of the autograd engine, which on small layers cost more than the kernels.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .layers import LayerType
from .rules import Rule
from .surrogate import decay_coefficients, mean_scale, surrogate_sums


@dataclass
class LocalTerm:
    """One recorded call of a plastic layer: what :func:`local_loss` needs of it."""

    edge: Optional[torch.autograd.graph.GradientEdge]  # where z enters the layer's backward; None if frozen
    post: torch.Tensor                       # y, detached
    decay: Optional[torch.Tensor]            # S_c per unit, None for S = 0
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    kind: LayerType
    groups: int
    scale: float                             # 1, or 1/N under reduction="mean"
    correlation: torch.Tensor                # <y, z>
    decay_norm: Optional[torch.Tensor]       # sum_c S_c (||W_c||^2 + b_c^2); the term is scale * (-<y, z> + decay_norm / 2)


def local_term(weight, bias, kind: LayerType, groups: int, output: torch.Tensor, post: torch.Tensor,
               rule: Rule, reduction: str) -> LocalTerm:
    """The term of one layer call whose ``output`` graph reaches only ``weight`` and ``bias``."""
    post, detached = post.detach(), output.detach()
    with torch.no_grad():
        decay = decay_coefficients(rule, kind, detached, post, weight.dtype)
        correlation, decay_norm = surrogate_sums(detached, post, weight, bias, decay, kind, groups)
    edge = torch.autograd.graph.get_gradient_edge(output) if output.requires_grad else None
    return LocalTerm(edge, post, decay, weight, bias, kind, groups, mean_scale(kind, output, reduction),
                     correlation, decay_norm)


def local_loss(terms: Sequence[LocalTerm], outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of ``terms`` as one scalar whose gradient w.r.t. each layer's weight and bias is minus
    the rule's update. ``outputs`` are the terms' outputs z: inputs of the node (they get no
    gradient), so that no layer's own backward node runs before this node's backward."""
    params: List[torch.Tensor] = []
    seen = set()
    for t in terms:
        for p in (t.weight, t.bias):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return _LocalSurrogates.apply(list(terms), len(outputs), *outputs, *params)


class _LocalSurrogates(torch.autograd.Function):
    """Forward: the sum of the terms' values. Backward: see the module docstring."""

    @staticmethod
    def forward(ctx, terms, n_outputs, *tensors):
        params = tensors[n_outputs:]
        ctx.terms, ctx.n_outputs = terms, n_outputs
        # saved, so that a weight or post changed in place before backward raises as autograd does
        ctx.save_for_backward(*params, *(t.post for t in terms))
        return _total_value(terms)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        n_params = len(saved) - len(ctx.terms)
        params = saved[:n_params]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[2 + ctx.n_outputs:]) if need]
        grads = _parameter_grads(ctx.terms, wanted, grad)
        return (None, None) + (None,) * ctx.n_outputs + tuple(grads.get(id(p)) for p in params)


def _total_value(terms: Sequence[LocalTerm]) -> torch.Tensor:
    """sum_r scale_r * (-<y_r, z_r> + decay_norm_r / 2), with a few operations for all the terms."""
    values = torch.stack([t.correlation for t in terms]).neg_()
    norms = [t.decay_norm for t in terms if t.decay_norm is not None]
    if norms:
        zero = norms[0].new_zeros(())
        values = torch.stack([zero if t.decay_norm is None else t.decay_norm for t in terms]).mul_(0.5) + values
    if any(t.scale != 1.0 for t in terms):
        values = values * torch.tensor([t.scale for t in terms], dtype=values.dtype, device=values.device)
    return values.sum()


def _parameter_grads(terms: Sequence[LocalTerm], wanted: Sequence[torch.Tensor], grad: torch.Tensor) -> dict:
    """{id(param): grad * (-sum y x + S W)} for the ``wanted`` weights and biases, by one call of the
    autograd engine over every term's edge. A term whose weight and bias belong to it alone, and whose
    y is larger than its weight, goes in unscaled and its gradients are scaled afterwards, so that only
    the smaller of y and the gradient is multiplied."""
    if not wanted:
        return {}
    wanted_ids = {id(p) for p in wanted}
    uses = Counter(id(p) for t in terms for p in (t.weight, t.bias) if p is not None)
    minus = grad.neg()
    edges, grad_outputs, rescale = [], [], []
    for t in terms:
        if not any(p is not None and id(p) in wanted_ids for p in (t.weight, t.bias)):
            continue
        factor = minus * t.scale if t.scale != 1.0 else minus
        alone = all(uses[id(p)] == 1 for p in (t.weight, t.bias) if p is not None)
        if alone and t.post.numel() > t.weight.numel():
            grad_outputs.append(t.post)
            rescale.append((t, factor))
        else:
            grad_outputs.append(t.post * factor)
        edges.append(t.edge)
    found = torch.autograd.grad(edges, list(wanted), grad_outputs, retain_graph=True)
    out = {id(p): g for p, g in zip(wanted, found)}
    for t, factor in rescale:
        for p in (t.weight, t.bias):
            if p is not None and id(p) in out:
                out[id(p)].mul_(factor)
    for t in terms:
        if t.decay is None:
            continue
        coefficient = t.decay * (grad * t.scale if t.scale != 1.0 else grad)
        if id(t.weight) in out:
            out[id(t.weight)].addcmul_(t.weight, t.kind.per_unit(coefficient, t.weight, t.groups))
        if t.bias is not None and id(t.bias) in out:
            out[id(t.bias)].addcmul_(t.bias, coefficient)
    return out
