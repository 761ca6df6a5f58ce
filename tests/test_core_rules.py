"""Property tests: the surrogate's -grad is exactly the rule's update (Miconi 2021).

For every supported layer type (Linear with any leading dims, Conv1d/2d/3d with every option,
ConvTranspose1d/2d/3d) and every rule, random configurations are checked in float64 against the
independent reference of tests/reference.py; then one SGD step, Adam steps, reduction="mean" and
the bare-weight form of surrogate_loss.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import hebbloss
from reference import RULES, channel_dim_of, decay_coefficients, layer_update, rule_update, unit_norms_sq

D = torch.float64
KINDS = ["linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"]
POSTS = {
    "identity": None,
    "tanh": torch.tanh,
    "relu_sq": lambda z: torch.relu(z) ** 2,
}
TOL = dict(rtol=1e-10, atol=1e-10)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


@st.composite
def layer_configs(draw, kind):
    """(module, input) of ``kind`` with random shapes and options, in float64."""
    bias = draw(st.booleans())
    if kind == "linear":
        lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
        n_in, n_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        return nn.Linear(n_in, n_out, bias=bias, dtype=D), (*lead, n_in)
    n = int(kind[-2])
    small = 2 if n == 3 else 3
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, small)) for _ in range(n))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    batch = draw(st.integers(1, 2))
    if kind.startswith("conv_transpose"):
        padding = tuple(draw(st.integers(0, 2)) for _ in range(n))
        out_pad = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        # smallest input whose output (L-1)*s - 2p + d(k-1) + op + 1 is at least 1
        lo = [1 + math.ceil(max(0, 2 * p - d * (k - 1) - op) / s) for p, d, k, op, s in zip(padding, dilation, kernel, out_pad, stride)]
        size = tuple(l + draw(st.integers(0, small - 1)) for l in lo)
        cls = getattr(nn, f"ConvTranspose{n}d")
        layer = cls(c_in, c_out, kernel, stride, padding, out_pad, groups, bias, dilation, dtype=D)
        return layer, (batch, c_in, *size)
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    choices = ["int", "valid"] + (["same"] if all(s == 1 for s in stride) else [])
    how = draw(st.sampled_from(choices))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(n)) if how == "int" else how
    reach = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    pad_max = [2] * n if how == "int" else [r for r in reach]
    lo = [max(r, p + 1) for r, p in zip(reach, pad_max)]  # output >= 1, and reflect needs pad < size
    size = tuple(l + draw(st.integers(0, small - 1)) for l in lo)
    cls = getattr(nn, f"Conv{n}d")
    layer = cls(c_in, c_out, kernel, stride, padding, dilation, groups, bias, padding_mode=mode, dtype=D)
    return layer, (batch, c_in, *size)


def _grads(layer):
    return [p.grad for p in (layer.weight, layer.bias) if p is not None]


def _minus(ref):
    return [-r for r in ref if r is not None]


def _assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOL)


def _run(layer, shape, rule, post, x_grad=False, **attach_kwargs):
    """Forward once through attach; returns (x, z, y) the layer saw and the plastic handle's loss."""
    x = torch.randn(shape, dtype=D, requires_grad=x_grad)
    plastic = hebbloss.attach(layer, rule=rule, post=post, **attach_kwargs)
    z = layer(x)
    y = z.detach() if post is None else post(z.detach())
    loss = plastic.loss()
    plastic.remove()
    return x, z.detach(), y, loss


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), post_name=st.sampled_from(sorted(POSTS)), detach_input=st.booleans())
def test_minus_grad_is_the_rule_update(kind, rule, data, post_name, detach_input):
    layer, shape = data.draw(layer_configs(kind))
    x, z, y, loss = _run(layer, shape, rule, POSTS[post_name], x_grad=True, detach_input=detach_input)
    loss.backward()
    assert x.grad is None  # strictly local: nothing flows to the input, graph kept whole or not
    _assert_all_close(_grads(layer), _minus(rule_update(layer, x.detach(), y, z, rule)))


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), rule=st.sampled_from(RULES), post_name=st.sampled_from(sorted(POSTS)))
def test_surrogate_loss_of_a_module(kind, data, rule, post_name):
    layer, shape = data.draw(layer_configs(kind))
    x = torch.randn(shape, dtype=D)
    z = layer(x)
    y = z.detach() if POSTS[post_name] is None else POSTS[post_name](z.detach())
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    grads = torch.autograd.grad(hebbloss.surrogate_loss(layer, z, y, rule=rule), params)
    _assert_all_close(list(grads), _minus(rule_update(layer, x, y, z.detach(), rule)))


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), rule=st.sampled_from(RULES), lr=st.floats(1e-3, 1.0))
def test_one_sgd_step_moves_w_by_lr_times_dw(kind, data, rule, lr):
    layer, shape = data.draw(layer_configs(kind))
    before = [p.detach().clone() for p in (layer.weight, layer.bias) if p is not None]
    x, z, y, loss = _run(layer, shape, rule, torch.tanh)
    ref = [r for r in rule_update(layer, x, y, z, rule) if r is not None]
    opt = torch.optim.SGD(hebbloss.layers.plastic_parameters(layer), lr=lr)
    loss.backward()
    opt.step()
    after = [p.detach() for p in (layer.weight, layer.bias) if p is not None]
    _assert_all_close(after, [b + lr * r for b, r in zip(before, ref)])


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), rule=st.sampled_from(RULES))
def test_adam_steps_equal_adam_fed_the_reference(kind, data, rule):
    """Three steps (Adam's first step is nearly sign(g), blind to the gradient's scale)."""
    layer, shape = data.draw(layer_configs(kind))
    twin = [p.detach().clone().requires_grad_(True) for p in hebbloss.layers.plastic_parameters(layer)]
    opt = torch.optim.Adam(hebbloss.layers.plastic_parameters(layer), lr=1e-2)
    twin_opt = torch.optim.Adam(twin, lr=1e-2)
    for _ in range(3):
        x, z, y, loss = _run(layer, shape, rule, torch.tanh)
        ref = [r for r in rule_update(layer, x, y, z, rule) if r is not None]
        opt.zero_grad()
        loss.backward()
        opt.step()
        for t, r in zip(twin, ref):
            t.grad = -r
        twin_opt.step()
        _assert_all_close([p.detach() for p in hebbloss.layers.plastic_parameters(layer)], [t.detach() for t in twin])


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), rule=st.sampled_from(RULES))
def test_mean_reduction_divides_by_samples_times_positions(kind, data, rule):
    layer, shape = data.draw(layer_configs(kind))
    x, z, y, loss = _run(layer, shape, rule, torch.tanh, reduction="mean")
    loss.backward()
    cdim = channel_dim_of(layer) % z.dim()
    pairs = math.prod(s for d, s in enumerate(z.shape) if d != cdim)
    _assert_all_close(_grads(layer), [-r / pairs for r in rule_update(layer, x, y, z, rule) if r is not None])


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), rule=st.sampled_from(RULES), reduction=st.sampled_from(["sum", "mean"]))
def test_loss_value_is_the_documented_surrogate(kind, data, rule, reduction):
    """L = (-sum(y*z) + 1/2 sum_c S_c (||W_c||^2 + b_c^2)) / (1 or N)."""
    layer, shape = data.draw(layer_configs(kind))
    x, z, y, loss = _run(layer, shape, rule, torch.tanh, reduction=reduction)
    cdim = channel_dim_of(layer)
    S = decay_coefficients(rule, y, z, cdim)
    expected = -(y * z).sum() + 0.5 * (S * unit_norms_sq(layer)).sum()
    if reduction == "mean":
        expected = expected / (z.numel() // z.shape[cdim])
    torch.testing.assert_close(loss.detach(), expected, **TOL)


_FUNCTIONAL = {"linear": F.linear, "conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


@pytest.mark.parametrize("kind", list(_FUNCTIONAL))
@given(data=st.data(), rule=st.sampled_from(RULES))
def test_bare_weight_form(kind, data, rule):
    """surrogate_loss(weight_tensor, F.conv(x, weight, ...), y): the weight's -grad is the rule's update."""
    layer, shape = data.draw(layer_configs(kind))
    x = torch.randn(shape, dtype=D)
    weight = layer.weight.detach().clone().requires_grad_(True)
    if kind == "linear":
        z = F.linear(x, weight)
    else:
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            layer.padding_mode, layer.padding = "zeros", tuple(0 for _ in layer.kernel_size)
        z = _FUNCTIONAL[kind](x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    y = torch.tanh(z.detach())
    (grad,) = torch.autograd.grad(hebbloss.surrogate_loss(weight, z, y, rule=rule), [weight])
    layer.bias = None
    S = decay_coefficients(rule, y, z.detach(), channel_dim_of(layer))
    dW, _ = layer_update(layer, x, y, S)
    torch.testing.assert_close(grad, -dW, **TOL)


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_reference_hebb_term_is_the_layers_correlation(kind, data):
    """Self-check of the reference against the layer's own forward: for any direction V,
    <dW_hebb, V> + <db_hebb, c> = sum(y * layer_{V,c}(x)), since the output is linear in (W, b)."""
    layer, shape = data.draw(layer_configs(kind))
    x = torch.randn(shape, dtype=D)
    with torch.no_grad():
        y = torch.randn_like(layer(x))
        S = torch.zeros(y.shape[channel_dim_of(layer)], dtype=D)
        dW, db = layer_update(layer, x, y, S)
        layer.weight.copy_(torch.randn_like(layer.weight))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn_like(layer.bias))
        expected = (y * layer(x)).sum()
        actual = (dW * layer.weight).sum() + (0 if db is None else (db * layer.bias).sum())
    torch.testing.assert_close(actual, expected, **TOL)


@pytest.mark.parametrize("shape, channel_dim, memory_format", [
    ((16, 16, 64, 64), 1, torch.contiguous_format),  # conv2d: per-sample norms over the positions (large
    # enough that a norm over batch and positions together, 1.5e-5 off, would fail)
    ((4, 8, 30, 30), 1, torch.channels_last),       # not contiguous: y*y summed over batch chunks
    ((37, 64, 16, 16), 1, torch.channels_last),     # several chunks of 1 MiB, the last one short
    ((3, 5, 4, 6, 7), 1, torch.contiguous_format),  # conv3d
    ((6, 5, 9), -1, torch.contiguous_format),       # linear over leading dims: units last
])
def test_oja_coefficients_in_float32_match_float64(shape, channel_dim, memory_format):
    """Oja's S_c = sum y^2 is computed without a y*y temporary where it can be; in float32 it must be as
    close to the float64 sum as a plain float32 sum is (a few units in the last place)."""
    torch.manual_seed(0)
    y = (3 * torch.randn(shape)).contiguous(memory_format=memory_format)
    S = hebbloss.rules.get("oja").coefficients(y, y, channel_dim)
    assert S.dtype == torch.float32
    cdim = channel_dim % y.dim()
    expected = (y.double() ** 2).movedim(cdim, 0).reshape(shape[cdim], -1).sum(dim=1)
    torch.testing.assert_close(S.double(), expected, rtol=2e-6, atol=0)


@pytest.mark.parametrize("rule", ["oja", "softhebb"])
@pytest.mark.parametrize("shape, channel_dim, memory_format", [
    ((7, 6, 5, 4), 1, torch.channels_last),
    ((7, 3, 10), -1, torch.contiguous_format),  # units last, chunks over the leading dimension
    ((9, 10), -1, torch.contiguous_format),
    ((6, 5, 4), 0, torch.contiguous_format),    # an unbatched conv1d: units first, nothing to chunk
])
def test_densities_summed_in_chunks_match_float64(monkeypatch, rule, shape, channel_dim, memory_format):
    """Summed one sample (or row) at a time, S_c of Oja (sum y^2) and SoftHebb (sum y*u) still equal the
    float64 sums of the plain densities."""
    monkeypatch.setattr(hebbloss.rules, "DENSITY_CHUNK_BYTES", 1)  # one row of the leading dimension per chunk
    torch.manual_seed(0)
    y = torch.randn(shape).contiguous(memory_format=memory_format)
    u = torch.randn(shape).contiguous(memory_format=memory_format)
    S = hebbloss.rules.get(rule).coefficients(y, u, channel_dim)
    cdim = channel_dim % y.dim()
    density = y.double() ** 2 if rule == "oja" else y.double() * u.double()
    expected = density.movedim(cdim, 0).reshape(shape[cdim], -1).sum(dim=1)
    torch.testing.assert_close(S.double(), expected, rtol=2e-6, atol=1e-6)


def test_a_subclass_that_changes_softhebbs_density_is_not_read_off_the_product():
    class Halved(hebbloss.rules.SoftHebb):
        def decay(self, post, output):
            return 0.5 * post * output
    assert hebbloss.rules.SoftHebb().decay_is_correlation()
    assert not Halved().decay_is_correlation()
    y, u = torch.ones(2, 3, 4, 4), torch.full((2, 3, 4, 4), 2.0)
    torch.testing.assert_close(Halved().coefficients(y, u, 1), torch.full((3,), 32.0))


def test_oja_coefficients_of_bfloat16_signals_are_reduced_in_float32():
    torch.manual_seed(0)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        y = torch.randn(2, 4, 16, 16).to(torch.bfloat16).contiguous(memory_format=memory_format)
        S = hebbloss.rules.get("oja").coefficients(y, y, 1)
        expected = (y.double() ** 2).sum(dim=(0, 2, 3))
        assert S.dtype == torch.float32
        torch.testing.assert_close(S.double(), expected, rtol=2e-6, atol=0)
