"""The surrogate terms of every plastic layer of a model as one autograd node (Miconi 2021).

:func:`hebbloss.attach` feeds each plastic layer a detached input, so the graph of a layer's output
reaches only that layer's weight and bias. :func:`local_loss` sums the recorded terms

    L = sum_r  scale_r * ( -<y_r, z_r> + 1/2 * sum_c S_rc (||W_c||^2 + b_c^2) )

in one node. The Hebbian half of its gradient, sum y x (and sum y for the bias), is what the layer's
own backward gives with y as the output gradient: the framework's weight-gradient kernel
(``convolution_backward`` or ``mm``). It is computed at whichever moment keeps less memory alive:

- where y is larger than the weight (early convolutions, large images), at once, in the forward hook,
  from the layer's graph (``torch.autograd.grad``); y is then let go and only the weight-sized result
  waits for the backward (the streaming of SoftHebb's hand-written update, as a gradient);
- elsewhere, in the node's backward, for all such layers in a single ``torch.autograd.grad`` call;
  except where the layer's family has a faster product for the call than the kernel of the layer's own
  backward (``weight_grad_is_faster``: a large convolution summed over few positions, on the CPU, as one
  matrix product with its input patches, :func:`hebbloss.layers.conv.takes_matmul`): then at once, by it.

With ``streaming=True`` every layer takes the first way, and its graph is not retained: nothing but
the weight-sized result and the decay coefficients outlive the forward hook. Where the layer's family
declares its backward halves (:meth:`hebbloss.layers.LayerType.adjoint`: every convolution and linear
layer), a sum y x taken at once (streamed or not) comes from that weight-gradient product directly,
on the CPU over the batch in chunks of at most ``CHUNK_BYTES`` of y where the weight is small
(``CHUNKED_WEIGHT_BYTES``): the kernel's workspace (a reordered copy of y and of the input, about the
size of y for the whole batch) then stays a few MiB, small enough for the CPU's cache, where the whole
batch's is not (large early feature maps run faster in chunks than in one call; ``benchmarks/speed.py``
times the steps); a large weight, and any layer on a GPU (which has no such cache and pays for every
kernel launch), in one call. The layer's graph is not needed (nor, with
``detach_input=False``, the re-run of the layer). Summed in chunks, the result is the whole batch's up
to float rounding. The term's value then comes from that product too (:func:`_term_from_product`), as
does SoftHebb's decay S_c = sum y z: with G = sum y x, <y_c, z_c> = <W_c, G_c> + b_c sum y_c, sums of
weight-sized tensors where reading y and z again would cost two more passes over the activations.

Where y is sparse (a k-winners-take-all post signal, Miconi 2021) and the layer large, that product is
instead gathered at y's nonzeros on the CPU (:func:`takes_sparse_product`, :mod:`hebbloss.layers.sparse`),
at once whatever the sizes: it then costs a copy of the input patches and a few additions per position
where the dense kernel multiplies every unit.

Under float16 autocast such a product is taken in float32: summed over a large layer's positions it
passes float16's 65,504 (bfloat16's range holds it; its product stays in bfloat16). A term that waits
for the backward gets its product in the layer's own precision there, as any backprop gradient
(a GradScaler keeps that in range).

The backward then multiplies by the upstream gradient whichever of y and the result is smaller, and
adds each unit's decay S_c W_c in place. The gradients are those of the plain expression (the property
tests check them in float64); what the backward carries besides (a task loss through the same layer,
``retain_graph=True``) adds to them as autograd would.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .layers import Adjoint, LayerType
from .rules import Rule, summed_density
from .surrogate import HALF, decay_coefficients, decay_norm, mean_scale, surrogate_sums


@dataclass
class LocalTerm:
    """One recorded call of a plastic layer: what :func:`local_loss` needs of it."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    kind: LayerType
    groups: int
    scale: float                             # 1, or 1/N under reduction="mean"
    decay: Optional[torch.Tensor]            # S_c per unit, None for S = 0
    correlation: torch.Tensor                # <y, z>
    decay_norm: Optional[torch.Tensor]       # sum_c S_c (||W_c||^2 + b_c^2); the term is scale * (-<y, z> + decay_norm / 2)
    hebbian: Dict[int, torch.Tensor]         # {id(param): sum y x} where it was computed at once, else empty
    post: Optional[torch.Tensor] = None      # y, kept for the backward where the Hebbian half waits for it
    edge: Optional[torch.autograd.graph.GradientEdge] = None  # for the same terms: where z enters the
    # layer's own backward, taken in the hook (an in-place op after the layer moves z's grad_fn)


CHUNK_BYTES = 4 * 2 ** 20  # y per weight-gradient call on the CPU (at least one sample); other devices: no chunks
CHUNKED_WEIGHT_BYTES = 2 ** 19  # the largest weight whose product is chunked: each chunk writes and adds a
# weight-sized result, which for a larger weight costs more than the cache saves (Xeon, 1 thread, batch 64:
# SoftHebb's 21 MiB layer 3 took 406 ms in chunks against 329 ms in one call; resnet18's 37 KiB conv1
# at batch 32, 64 ms in chunks against 95 ms)


def local_term(weight, bias, kind: LayerType, groups: int, output: torch.Tensor, post: torch.Tensor,
               rule: Rule, reduction: str, streaming: bool = False, adjoint: Optional[Adjoint] = None,
               x: Optional[torch.Tensor] = None, sparse: bool = False) -> LocalTerm:
    """The term of one layer call whose ``output`` graph reaches only ``weight`` and ``bias``.
    ``streaming``: take the Hebbian half at once whatever the sizes and free ``output``'s graph (the
    caller guarantees nothing else backpropagates through it). Where it is taken at once (:func:`at_once`)
    and the layer family's ``adjoint`` for this call and its input ``x`` are given, it is taken in batch
    chunks by that adjoint, without the graph (which stays as it was for any other backward);
    ``sparse`` (:func:`takes_sparse_product`): at once, from y's nonzeros."""
    post, detached = (post.detach() if post.requires_grad else post), output.detach()
    learning = [p for p in (weight, bias) if p is not None and p.requires_grad]
    trained = bool(learning) and output.requires_grad
    now = trained and at_once(weight, post, streaming, sparse, adjoint)
    by_adjoint = now and adjoint is not None and x is not None
    # the term's sums read off G where y is the larger (reading W and G costs less than reading y and z
    # again), not in half precision (a bfloat16 G is rounded where <y, z> summed in float32 is not)
    if by_adjoint and any(p is weight for p in learning) and (bias is None or _per_unit_bias(bias, kind, post)) \
            and post.dtype not in HALF and post.numel() > weight.numel():
        return _term_from_product(weight, bias, kind, groups, output, post, rule, reduction, adjoint, x, learning,
                                  sparse)
    with torch.no_grad():
        decay = decay_coefficients(rule, kind, detached, post, weight.dtype)
        correlation, decay_norm = surrogate_sums(detached, post, weight, bias, decay, kind, groups)
    term = LocalTerm(weight, bias, kind, groups, mean_scale(kind, output, reduction), decay, correlation,
                     decay_norm, {})
    if not trained:
        return term  # a frozen layer: its term has a value and no gradient
    if not now:
        term.post, term.edge = post, torch.autograd.graph.get_gradient_edge(output)
    elif by_adjoint:  # half precision, a frozen weight, or a bias that is not one value per unit
        term.hebbian = chunked_hebbian(weight, bias, kind, adjoint, x.detach(), post, learning, sparse=sparse)
    else:
        # the bias's sum y is summed here, not asked of the graph: convolution_backward is 5-20% slower on
        # CPU when it also returns the bias gradient (mkldnn depthwise, channels-last 1x1); same sum
        by_sum = bias is not None and any(p is bias for p in learning) and _per_unit_bias(bias, kind, post)
        by_graph = [p for p in learning if not (by_sum and p is bias)]
        found = _grad([output], by_graph, [post], retain_graph=not streaming) if by_graph else ()
        term.hebbian = {id(p): g for p, g in zip(by_graph, found)}
        if by_sum:
            term.hebbian[id(bias)] = _bias_sum(post, kind, bias)
    return term


def _term_from_product(weight, bias, kind: LayerType, groups: int, output, post, rule: Rule, reduction: str,
                       adjoint: Adjoint, x: torch.Tensor, learning, sparse: bool = False) -> LocalTerm:
    """The term of a layer whose Hebbian half is taken at once by its family's weight-gradient product
    G = sum y x, for y larger than the weight. As z = W x + b is linear in W, each unit's correlation is
    <y_c, z_c> = <W_c, G_c> + b_c sum y_c: the loss's value (and SoftHebb's S_c, which is that
    correlation) comes from weight-sized tensors, where reading y and z again would cost two passes
    over the layer's activations. Equal to the direct sums up to float rounding. Not for half-precision
    signals (autocast): a bfloat16 G is rounded to 8 bits, where the float32 sum <y, z> is not."""
    hebbian = chunked_hebbian(weight, bias, kind, adjoint, x.detach(), post, learning, sparse=sparse)
    with torch.no_grad():
        wide = torch.promote_types(weight.dtype, torch.float32)
        product = kind.unit_weights(hebbian[id(weight)], groups).to(wide)
        units = (kind.unit_weights(weight, groups).to(wide) * product).sum(dim=1)
        if bias is not None:
            post_sum = hebbian[id(bias)] if id(bias) in hebbian else _bias_sum(post, kind, bias)
            units.addcmul_(bias.to(wide), post_sum.to(wide))
        if rule.decay_is_correlation():
            decay = units.to(weight.dtype)
        else:
            decay = decay_coefficients(rule, kind, output.detach(), post, weight.dtype)
        norm = decay_norm(weight, bias, decay, kind, groups)
    return LocalTerm(weight, bias, kind, groups, mean_scale(kind, output, reduction), decay, units.sum(), norm, hebbian)


def at_once(weight: torch.Tensor, post: torch.Tensor, streaming: bool, sparse: bool = False,
            adjoint: Optional[Adjoint] = None) -> bool:
    """Whether a layer call's Hebbian half sum y x is taken in its forward hook (always when streaming
    or from y's nonzeros; else where y is larger than the weight, or where the family's ``adjoint``
    takes the product faster than the layer's own backward would) rather than in the loss's backward."""
    if streaming or sparse or post.numel() > weight.numel():
        return True
    faster = getattr(adjoint, "weight_grad_is_faster", None)
    return faster is not None and faster(post, weight)


SPARSE_GAIN = 64  # see takes_sparse_product


def takes_sparse_product(adjoint: Optional[Adjoint], post: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a layer call's Hebbian product sum y x is gathered at the nonzeros of its post signal y
    (``adjoint.sparse_weight_grad``, :mod:`hebbloss.layers.sparse`) rather than taken by the dense
    kernel: on the CPU, where the layer's family has that product for this call. Per output position,
    the dense kernel does C x K multiply-adds (C units, fan-in K); the gather reads y's C values, copies
    the input patch (K) and adds the patch at each of the k nonzeros (k x K). It is taken where
    C K >= SPARSE_GAIN (C + K (1 + k)), k counted on the first 1/16 of the batch (one sample at least).
    Measured on a Xeon (AVX512, 1 thread) with Miconi 2021's binarised k-WTA (k=1): his layers 2 and 3
    (C x K = 196 x 900 and 400 x 1,764) 2.3x and 2.8x faster by the gather at batch 10, 2.5x and 5x at
    batch 100; his layer 1 (100 x 75), which the rule leaves to the dense kernel, 2x slower by the gather.
    ``benchmarks/speed.py`` times the steps."""
    if adjoint is None or getattr(adjoint, "sparse_weight_grad", None) is None or post.device.type != "cpu" \
            or post.numel() == 0:
        return False
    units, fan_in = weight.shape[0], weight[0].numel()
    if units * fan_in < SPARSE_GAIN * (units + fan_in):  # too little work even for k = 0
        return False
    batched = post.dim() >= weight.dim()  # conv: [B, C, *spatial] against [C, C_in, *kernel]; Linear: [..., C]
    sample = post[:max(1, post.shape[0] // 16)] if batched else post
    per_position = int(sample.bool().sum()) * units / sample.numel()  # count_nonzero: 5x slower on a channels-last y
    return units * fan_in >= SPARSE_GAIN * (units + fan_in * (1 + per_position))


def chunked_hebbian(weight, bias, kind: LayerType, adjoint: Adjoint, x: torch.Tensor, post: torch.Tensor,
                    learning: Sequence[torch.Tensor], chunk_bytes: Optional[int] = None,
                    sparse: bool = False) -> Dict[int, torch.Tensor]:
    """{id(param): sum y x for the weight, sum y for the bias} of the ``learning`` ones among ``weight``
    and ``bias``, for a call on input ``x`` whose post signal is ``post``: the layer's weight-gradient
    product (``adjoint.weight_grad``) summed over batch chunks of at most ``chunk_bytes`` of ``post``
    (default: :data:`CHUNK_BYTES` on the CPU for a weight of at most :data:`CHUNKED_WEIGHT_BYTES`, 0
    elsewhere; 0 means the whole batch in one call; one sample at least; an unbatched call is one chunk).
    ``sparse``: the product from y's nonzeros instead (``adjoint.sparse_weight_grad``, in chunks of its own)."""
    out: Dict[int, torch.Tensor] = {}
    with torch.no_grad(), _without_autocast(post.device.type):  # the dtypes are chosen here, not by autocast
        if any(p is weight for p in learning):
            out[id(weight)] = adjoint.sparse_weight_grad(post, x, weight) if sparse else \
                _dense_product(weight, kind, adjoint, x, post, chunk_bytes)
        if bias is not None and any(p is bias for p in learning):
            out[id(bias)] = _bias_sum(post, kind, bias)
    return out


def _dense_product(weight, kind: LayerType, adjoint: Adjoint, x: torch.Tensor, post: torch.Tensor,
                   chunk_bytes: Optional[int]) -> torch.Tensor:
    """sum y x by the dense kernel (``adjoint.weight_grad``), in batch chunks (see :func:`chunked_hebbian`)."""
    if chunk_bytes is None:
        small = weight.numel() * weight.element_size() <= CHUNKED_WEIGHT_BYTES
        chunk_bytes = CHUNK_BYTES if post.device.type == "cpu" and small else 0
    batched = post.dim() > kind.spatial_dims + 1  # a leading batch dimension, shared with x
    # float16 tops out at 65,504, which a sum of y x over a large layer's positions passes (autocast's
    # float16 kernels return the sum in float16): that product is taken in float32. So is a bfloat16
    # depthwise one on the CPU (one input channel per unit): oneDNN's bfloat16 kernel for it took 3x
    # float32's time (Xeon with AMX, channels-last [16, 40, 56, 56], 7x7: 70 ms against 24 with the
    # conversions), where every other convolution's is 2-5x faster in bfloat16
    depthwise_bf16 = post.dtype == torch.bfloat16 and post.device.type == "cpu" and weight.dim() > 2 \
        and weight.shape[1] == 1
    dtype = torch.float32 if post.dtype == torch.float16 or depthwise_bf16 else post.dtype
    per_sample = post[0].numel() * post.element_size() if batched and post.shape[0] > 0 else 0
    step = post.shape[0] if not (per_sample and chunk_bytes) else max(1, chunk_bytes // per_sample)
    if not batched or step >= post.shape[0]:
        return adjoint.weight_grad(post.to(dtype), x, weight)
    grad = None
    for y_c, x_c in zip(post.split(step), x.split(step)):
        g = adjoint.weight_grad(y_c.to(dtype), x_c, weight)
        grad = g if grad is None else grad.add_(g)
    return grad


def _without_autocast(device_type: str):
    """Autocast off on ``device_type`` (which a forward hook runs under), where the device has autocast."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # no autocast on this device (meta)
        return contextlib.nullcontext()


def _per_unit_bias(bias: torch.Tensor, kind: LayerType, post: torch.Tensor) -> bool:
    """Whether ``bias`` is one value per unit (z = W x + b_c), so that its gradient is y summed per unit."""
    return bias.dim() == 1 and post.dim() > 0 and bias.shape[0] == post.shape[kind.channel_dim(post)]


def _bias_sum(post: torch.Tensor, kind: LayerType, bias: torch.Tensor) -> torch.Tensor:
    """sum y over every dimension but the units' (the bias's Hebbian term), in the bias's dtype."""
    with torch.no_grad():
        channel = kind.channel_dim(post) % post.dim()
        dims = [d for d in range(post.dim()) if d != channel]
        if not dims:  # an unbatched Linear's y is the sum itself (sum(dim=[]) would sum everything)
            return post.to(bias.dtype, copy=True)
        if post.dtype in HALF:  # in float32, a batch chunk at a time (no activation-sized float32 copy)
            return summed_density(_itself, post, post, channel).to(bias.dtype)
        return post.sum(dim=dims).to(bias.dtype)


def _itself(post: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return post


_COMPILED_ONCE = (
    "a plastic layer's output comes from a torch.compile'd graph whose backward may run only once (it donates "
    "its buffers), but hebbloss keeps the layer's graph for a later backward (a task loss through the same "
    "layer). For purely local training pass streaming=True to hebbloss.attach (each layer's graph is used once); "
    "else set torch._functorch.config.donated_buffer = False before the first call of the compiled model"
)


def _grad(outputs, inputs, grad_outputs, retain_graph):
    """torch.autograd.grad, with what to do when a compiled graph refuses a retained backward."""
    try:
        return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph)
    except RuntimeError as e:
        if retain_graph and "donated buffer" in str(e):
            raise RuntimeError(_COMPILED_ONCE) from e
        raise


def local_loss(terms: Sequence[LocalTerm], outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of ``terms`` as one scalar whose gradient w.r.t. each layer's weight and bias is minus
    the rule's update. ``outputs``: the outputs z of the terms that kept y (those with an ``edge``), in
    their order; inputs of the node (they get no gradient from it), so that no layer's own backward
    node runs before it."""
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
        ctx.edges = [t.edge for t in terms if t.edge is not None]
        ctx.terms, ctx.n_outputs, ctx.n_params = terms, n_outputs, len(params)
        # saved, so that a weight or y changed in place before the backward raises as autograd does
        ctx.save_for_backward(*params, *(t.post for t in terms if t.post is not None))
        return _total_value(terms)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        params = ctx.saved_tensors[:ctx.n_params]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[2 + ctx.n_outputs:]) if need]
        grads = _parameter_grads(ctx.terms, ctx.edges, wanted, grad)
        return (None, None) + (None,) * ctx.n_outputs + tuple(grads.get(id(p)) for p in params)


def _total_value(terms: Sequence[LocalTerm]) -> torch.Tensor:
    """sum_r scale_r * (-<y_r, z_r> + decay_norm_r / 2), with a few operations for all the terms; in
    float32 at least (a layer under bfloat16 autocast gives a bfloat16 <y, z>)."""
    values = torch.stack([t.correlation for t in terms])
    values = values.to(torch.promote_types(values.dtype, torch.float32)).neg_()
    norms = [t.decay_norm for t in terms if t.decay_norm is not None]
    if norms:
        zero = norms[0].new_zeros(())
        values = torch.stack([zero if t.decay_norm is None else t.decay_norm for t in terms]).mul_(0.5) + values
    if any(t.scale != 1.0 for t in terms):
        values = values * torch.tensor([t.scale for t in terms], dtype=values.dtype, device=values.device)
    return values.sum()


def _parameter_grads(terms: Sequence[LocalTerm], edges, wanted: Sequence[torch.Tensor], grad: torch.Tensor) -> dict:
    """{id(param): grad * (-sum y x + S W)} for the ``wanted`` weights and biases."""
    if not wanted:
        return {}
    wanted_ids = {id(p) for p in wanted}
    minus = grad.neg()
    out: Dict[int, torch.Tensor] = {}

    def add(key, g):
        out[key] = g if key not in out else out[key].add_(g)

    grad_outputs = []  # for the terms that kept y, in the order of their edges
    for t in terms:
        factor = minus * t.scale if t.scale != 1.0 else minus
        if t.post is not None:
            grad_outputs.append(t.post * factor)  # y is the smaller here
        for key, hebbian in t.hebbian.items():
            if key in wanted_ids:
                add(key, hebbian * factor)  # and here the weight
    waiting_ids = {id(q) for t in terms if t.post is not None for q in (t.weight, t.bias) if q is not None}
    waiting = [p for p in wanted if id(p) in waiting_ids]
    if waiting:
        for p, g in zip(waiting, _grad(edges, waiting, grad_outputs, retain_graph=True)):
            add(id(p), g)
    for t in terms:
        if t.decay is None:
            continue
        coefficient = t.decay * (grad * t.scale if t.scale != 1.0 else grad)
        if id(t.weight) in out:
            out[id(t.weight)].addcmul_(t.weight, t.kind.per_unit(coefficient, t.weight, t.groups))
        if t.bias is not None and id(t.bias) in out:
            out[id(t.bias)].addcmul_(t.bias, coefficient)
    return out
