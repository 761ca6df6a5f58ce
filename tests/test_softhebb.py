"""SoftHebb (Journe et al. 2023): the surrogate gradient of rule="softhebb" with a SoftWTA post
equals the explicit update dW = y (x - u W), and the optimizer extras (max-abs normalisation,
per-neuron rate |norm - 1| ** 0.5) match a plain float64 computation."""
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import hebbloss
from hebbloss import prune, softhebb
from hebbloss.competition import SoftWTA
from reference import layer_update

D = torch.float64


def soft_wta_by_hand(u, beta, anti, cdim):
    """exp(beta u_c) / sum_j exp(beta u_j); every channel but the argmax negated when anti."""
    e = torch.exp(beta * (u - u.amax(dim=cdim, keepdim=True)))
    y = e / e.sum(dim=cdim, keepdim=True)
    if anti:
        sign = -torch.ones_like(u)
        sign.scatter_(cdim, u.argmax(dim=cdim, keepdim=True), 1.0)
        y = y * sign
    return y


def make_layer(kind, c_in, c_out, stride, padding, bias, reflect, groups):
    if kind == "linear":
        return nn.Linear(c_in, c_out, bias=bias)
    if kind == "conv1d":
        return nn.Conv1d(c_in, c_out, 3, stride=stride, padding=padding, bias=bias)
    if kind == "conv2d":
        return nn.Conv2d(c_in * groups, c_out * groups, 3, stride=stride, padding=padding, bias=bias, groups=groups,
                         padding_mode="reflect" if reflect and padding else "zeros")
    return nn.ConvTranspose2d(c_in * groups, c_out * groups, 3, stride=stride, padding=padding, bias=bias, groups=groups)


def make_input(kind, layer, batch, g):
    if kind == "linear":
        return torch.randn(batch, 2, layer.in_features, generator=g, dtype=D)
    if kind == "conv1d":
        return torch.randn(batch, layer.in_channels, 7, generator=g, dtype=D)
    return torch.randn(batch, layer.in_channels, 5, 6, generator=g, dtype=D)


@given(
    kind=st.sampled_from(["linear", "conv1d", "conv2d", "conv_transpose2d"]),
    c_in=st.integers(1, 3), c_out=st.integers(2, 5), batch=st.integers(1, 3),
    stride=st.integers(1, 2), padding=st.integers(0, 1), bias=st.booleans(), reflect=st.booleans(),
    groups=st.integers(1, 2), beta=st.floats(0.1, 3.0), anti=st.booleans(), seed=st.integers(0, 2**16),
)
def test_softhebb_surrogate_gradient_is_the_explicit_update(kind, c_in, c_out, batch, stride, padding, bias, reflect,
                                                            groups, beta, anti, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = make_layer(kind, c_in, c_out, stride, padding, bias, reflect, groups).double()
    x = make_input(kind, layer, batch, g)
    cdim = -1 if kind == "linear" else 1
    plastic = hebbloss.attach(layer, rule="softhebb", post=SoftWTA(beta, anti_hebbian=anti, channel_dim=cdim))
    u = layer(x)
    plastic.loss().backward()
    u = u.detach()
    y = soft_wta_by_hand(u, beta, anti, cdim)
    dims = [d for d in range(u.dim()) if d != cdim % u.dim()]
    S = (y * u).sum(dim=dims)
    dW, db = layer_update(layer, x, y, S)
    assert torch.allclose(-layer.weight.grad, dW, rtol=1e-9, atol=1e-10)
    if bias:
        assert torch.allclose(-layer.bias.grad, db, rtol=1e-9, atol=1e-10)
    plastic.remove()


def explicit_conv_update(weight, x, y, u):
    """dW_c = sum_{b,p} y x_patch - (sum y u) W_c for a stride-1 Conv2d without padding (F.unfold)."""
    patches = torch.nn.functional.unfold(x, weight.shape[2:])             # [B, in*k*k, P]
    yf = y.flatten(2)                                                       # [B, C, P]
    yx = torch.einsum("bcp,bip->ci", yf, patches)
    yu = (y * u).sum(dim=(0, 2, 3))
    return (yx - yu[:, None] * weight.flatten(1)).reshape(weight.shape)


@pytest.mark.parametrize("pruned", [False, True])
def test_sgd_step_with_softhebb_extras_matches_the_paper(pruned):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, bias=False).double()
    softhebb.init_radius(conv, radius=1.5)
    if pruned:
        prune.random_connections(conv, 0.5, seed=3)
    x = torch.randn(3, 2, 5, 5, dtype=D)
    eta, beta = 0.05, 0.8
    w_eff = conv.weight.detach().clone() if not pruned else (conv.weight_orig * conv.weight_mask).detach().clone()
    plastic = hebbloss.attach(conv, rule="softhebb", post=SoftWTA(beta))
    opt = torch.optim.SGD(softhebb.param_groups(plastic, eta), lr=0.0)
    handle = softhebb.scale_updates(opt, plastic)
    u = conv(x)
    plastic.loss().backward()
    opt.step()
    y = soft_wta_by_hand(u.detach(), beta, True, 1)
    delta = explicit_conv_update(w_eff, x, y, u.detach())
    if pruned:  # removed connections get no update: they are not in the normalisation either
        delta = delta * conv.weight_mask
    delta = delta / delta.abs().max()
    norms = torch.tensor([math.sqrt(float((w_eff[c] ** 2).sum())) for c in range(4)], dtype=D)
    rate = (norms - 1).abs().add(1e-10).sqrt().view(4, 1, 1, 1)
    expected = w_eff + eta * rate * delta
    new = conv.weight_orig * conv.weight_mask if pruned else conv.weight
    assert torch.allclose(new.detach(), expected, rtol=1e-10, atol=1e-12)
    handle.remove()
    opt.zero_grad()
    conv(x)
    plastic.loss().backward()
    raw = conv.weight_orig.grad.clone() if pruned else conv.weight.grad.clone()
    opt.step()  # hook removed: the gradient is used as is
    assert torch.equal((conv.weight_orig if pruned else conv.weight).grad, raw)
    plastic.remove()


def test_scaling_of_linear_layer_with_bias():
    torch.manual_seed(1)
    lin = nn.Linear(3, 4).double()
    plastic = hebbloss.attach(lin, rule="softhebb", post=SoftWTA(1.0, channel_dim=-1))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    softhebb.scale_updates(opt, plastic, power=0.5)
    lin(torch.randn(5, 3, dtype=D))
    plastic.loss().backward()
    gw, gb = lin.weight.grad.clone(), lin.bias.grad.clone()
    peak = max(float(gw.abs().max()), float(gb.abs().max()))
    rate = torch.tensor([abs(float(lin.weight.detach()[c].norm()) - 1) + 1e-10 for c in range(4)], dtype=D).sqrt()
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt.step()
    assert torch.allclose(lin.weight, w0 - 0.1 * rate[:, None] * gw / peak)
    assert torch.allclose(lin.bias, b0 - 0.1 * rate * gb / peak)
    plastic.remove()


def test_init_radius_gives_norms_near_radius():
    conv = nn.Conv2d(96, 64, 3)
    softhebb.init_radius(conv, 25.0, generator=torch.Generator().manual_seed(0))
    norms = conv.weight.detach().flatten(1).norm(dim=1)
    assert abs(float(norms.mean()) - 25.0) < 1.0 and float(norms.std()) < 2.0
    assert torch.equal(conv.bias, torch.zeros(64))


def test_softhebb_bad_arguments():
    conv = nn.Conv2d(2, 3, 3)
    plastic = hebbloss.attach(conv, rule="softhebb", post=SoftWTA(1.0))
    with pytest.raises(ValueError, match="not in the optimizer"):
        softhebb.scale_updates(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), plastic)
    with pytest.raises(ValueError, match="missing"):
        softhebb.param_groups(plastic, {"other": 0.1})
    with pytest.raises(ValueError, match="radius"):
        softhebb.init_radius(conv, -1.0)
    plastic.remove()
