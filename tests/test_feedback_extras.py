"""Amit's hinge cost, untied convolutions, Batch Manhattan and the alignment metrics."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hebbloss import feedback as fb


pytestmark = pytest.mark.usefixtures("float64_default")  # the references below are float64


# --- Amit's last-layer cost -------------------------------------------------------------------

def _amit_reference(h, y, mu):
    total = 0.0
    n, c = h.shape
    for i in range(n):
        loss = max(0.0, 1.0 - float(h[i, y[i]]))
        loss += mu / (c - 1) * sum(max(0.0, 1.0 + float(h[i, k])) for k in range(c) if k != y[i])
        total += loss
    return total / n


@pytest.mark.parametrize("mu", [0.0, 0.5, 2.0])
def test_amit_hinge_matches_plain_formula_and_its_hebbian_derivative(mu):
    h = (torch.randn(6, 4) * 1.5).requires_grad_(True)
    y = torch.tensor([0, 3, 1, 1, 2, 0])
    loss = fb.AmitHingeLoss(mu)(h, y)
    assert loss.item() == pytest.approx(_amit_reference(h.detach(), y, mu), rel=1e-12)
    loss.backward()
    expected = torch.zeros(6, 4)
    for i in range(6):
        for k in range(4):
            if k == y[i]:
                expected[i, k] = -1.0 if h[i, k] < 1 else 0.0
            else:
                expected[i, k] = mu / 3 if h[i, k] > -1 else 0.0
    torch.testing.assert_close(h.grad, expected / 6)


def test_amit_hinge_bad_input():
    with pytest.raises(ValueError, match="labels must lie in \\[0, 2\\]"):
        fb.AmitHingeLoss()(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape \\[N, C\\]"):
        fb.AmitHingeLoss()(torch.zeros(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="mu must be >= 0"):
        fb.AmitHingeLoss(-1)


# --- LocallyConnected2d and untie ---------------------------------------------------------------

def _untied_reference(x, weight, bias, stride, padding, dilation, groups):
    """Loop over output positions: each applies its own filter as a 1-position conv."""
    oh, ow = weight.shape[:2]
    kh, kw = weight.shape[-2:]
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    out = torch.zeros(x.shape[0], weight.shape[2], oh, ow)
    for i in range(oh):
        for j in range(ow):
            r, c = i * stride[0], j * stride[1]
            patch = xp[:, :, r: r + dilation[0] * (kh - 1) + 1, c: c + dilation[1] * (kw - 1) + 1]
            out[:, :, i, j] = F.conv2d(patch, weight[i, j], None, 1, 0, dilation, groups)[:, :, 0, 0]
    return out if bias is None else out + bias


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(dilation=2, padding=2, groups=2), dict(padding="same")])
def test_locally_connected_from_conv_equals_conv_and_loop_reference(kw):
    conv = nn.Conv2d(4, 6, 3, **kw)
    x = torch.randn(2, 4, 7, 6)
    lc = fb.LocallyConnected2d.from_conv(conv, (7, 6))
    torch.testing.assert_close(lc(x), conv(x))
    with torch.no_grad():
        lc.weight.add_(torch.randn_like(lc.weight) * 0.1)  # now untied
    pad = lc.padding
    torch.testing.assert_close(lc(x), _untied_reference(x, lc.weight, lc.bias, lc.stride, pad, lc.dilation, lc.groups))


def test_locally_connected_feedback_gradients_match_autograd_reference():
    lc = fb.LocallyConnected2d(4, 6, (6, 5), 3, stride=2, padding=1, groups=2)
    h = fb.convert(lc, "urfb")
    x = torch.randn(3, 4, 6, 5, requires_grad=True)
    out = lc(x)
    readout = torch.randn_like(out)
    (out * readout).sum().backward()
    # float64 references by autograd through the per-position loop: with B for the input, with W for W and B
    B = h.feedback_weight("").detach()
    conf = ((2, 2), (1, 1), (1, 1), 2)
    xi = x.detach().clone().requires_grad_(True)
    ref_x = torch.autograd.grad((_untied_reference(xi, B, None, *conf) * readout).sum(), xi)[0]
    w, b = lc.weight.detach().clone().requires_grad_(True), lc.bias.detach().clone().requires_grad_(True)
    ref_w, ref_b = torch.autograd.grad((_untied_reference(x.detach(), w, b, *conf) * readout).sum(), (w, b))
    torch.testing.assert_close(x.grad, ref_x)
    torch.testing.assert_close(lc.weight.grad, ref_w)
    torch.testing.assert_close(lc.feedback_weight.grad, ref_w)
    torch.testing.assert_close(lc.bias.grad, ref_b)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(dilation=2, padding=2, groups=2)])
def test_locally_connected_backward_matches_the_loop_reference(kw):
    """Plain autograd (no feedback): the written-out backward of local_conv2d against the loop's."""
    lc = fb.LocallyConnected2d(4, 6, (7, 6), 3, **kw)
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    readout = torch.randn(2, 6, *lc.output_size)
    grads = torch.autograd.grad((lc(x) * readout).sum(), (x, lc.weight, lc.bias))
    conf = (lc.stride, lc.padding, lc.dilation, lc.groups)
    ref = torch.autograd.grad((_untied_reference(x, lc.weight, lc.bias, *conf) * readout).sum(), (x, lc.weight, lc.bias))
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want)


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.bn(self.conv1(x)))).flatten(1))


def test_untie_keeps_outputs_and_keys_and_refuses_bad_layers():
    model = _Small()
    x = torch.randn(2, 3, 6, 6)
    model.eval()
    before = model(x)
    keys = list(model.state_dict())
    model.train()
    new = fb.untie(model, (3, 6, 6))
    assert set(new) == {"conv1", "conv2"} and isinstance(model.conv2, fb.LocallyConnected2d)
    assert model.training and model.conv2.training
    assert list(model.state_dict()) == keys
    model.eval()
    torch.testing.assert_close(model(x), before)
    assert model.bn.num_batches_tracked == 0, "the probe pass must not touch BatchNorm statistics"

    bad = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="(?s)1: padding_mode='reflect'"):
        fb.untie(bad, (3, 5, 5))
    assert type(bad[0]) is nn.Conv2d
    with pytest.raises(ValueError, match="expects input \\[N, 3, 5, 5\\]"):
        fb.LocallyConnected2d.from_conv(bad[0], 5)(torch.zeros(1, 3, 6, 6))


# --- Batch Manhattan ----------------------------------------------------------------------------

def test_batch_manhattan_steps_by_the_sign_with_any_optimizer_and_scheduler():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    opt = fb.BatchManhattan(torch.optim.SGD([w], lr=0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    g = torch.tensor([0.3, -5.0, 0.0, 1e-6])
    w.grad = g.clone()
    opt.step()
    sched.step()
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -2.0, 3.0, 0.5]) - 0.1 * torch.sign(g))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.zero_grad()
    assert w.grad is None

    v = nn.Parameter(torch.tensor([2.0, -1.0]))
    inner = torch.optim.SGD([v], lr=0.5)
    opt = fb.BatchManhattan(inner)

    def closure():
        opt.zero_grad()
        loss = (v * torch.tensor([3.0, 4.0])).sum()
        loss.backward()
        return loss
    opt.step(closure)
    torch.testing.assert_close(v.detach(), torch.tensor([1.5, -1.5]))
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        fb.BatchManhattan([v])


# --- metrics ------------------------------------------------------------------------------------

def _angle_reference(a, b):
    a, b = a.flatten().tolist(), b.flatten().tolist()
    dot = sum(p * q for p, q in zip(a, b))
    na, nb = math.sqrt(sum(p * p for p in a)), math.sqrt(sum(q * q for q in b))
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / (na * nb)))))


def test_feedback_angles():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    h = fb.convert(model, "fa")
    angles = fb.feedback_angles(model)
    for n in ("0", "2"):
        assert angles[n] == pytest.approx(_angle_reference(model[int(n)].weight, model[int(n)].feedback_weight), abs=1e-9)
    h.remove()
    fb.convert(model, "usf")
    assert all(a < 90 for a in fb.feedback_angles(model).values())
    with pytest.raises(ValueError, match="no layer converted"):
        fb.feedback_angles(nn.Linear(2, 2))


def test_input_gradient_angles_against_hand_computed_signals():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3), nn.BatchNorm1d(3))
    fb.convert(model, "fa")
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    running = model[4].running_mean.clone()
    angles = fb.input_gradient_angles(model, F.cross_entropy, x, y)
    torch.testing.assert_close(model[4].running_mean, running)
    assert all(p.grad is None for p in model.parameters())
    # reference for the last Linear: the same dropout mask in both passes, so its input gradient is
    # delta @ B (feedback) versus delta @ W (backprop), delta = dL/dz of that layer
    torch.manual_seed(11)
    angles = fb.input_gradient_angles(model, F.cross_entropy, x, y)
    torch.manual_seed(11)
    h1 = model[2](torch.tanh(F.linear(x, model[0].weight, model[0].bias)))  # the metric's dropout mask
    z = F.linear(h1, model[3].weight, model[3].bias).detach().requires_grad_(True)
    loss = F.cross_entropy(model[4](z), y)
    delta = torch.autograd.grad(loss, z)[0]
    expected = _angle_reference(delta @ model[3].feedback_weight, delta @ model[3].weight)
    assert angles["3"] == pytest.approx(expected, abs=1e-6)
    assert 0 < angles["0"] <= 180
    model_bp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    fb.convert(model_bp, "bp")
    assert all(a == pytest.approx(0.0, abs=1e-5) for a in fb.input_gradient_angles(model_bp, F.cross_entropy, x, y).values())


def test_untie_refuses_a_lone_conv():
    with pytest.raises(ValueError, match="from_conv"):
        fb.untie(nn.Conv2d(3, 3, 3), (3, 5, 5))
