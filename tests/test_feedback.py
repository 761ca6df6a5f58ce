"""hebbloss.feedback.convert: gradients against plain float64 autograd references, modes, errors."""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune  # noqa: F401  (the pruned-layer test)
from hypothesis import given, strategies as st
from timm.layers import Conv2dSame, StdConv2d
from torch import nn

from hebbloss import feedback as fb



pytestmark = pytest.mark.usefixtures("float64_default")  # the references below are float64


def _grads_through(module, x, weight_for_input, readout):
    """Reference: autograd of a plain copy of ``module``: input gradient of the copy whose weight
    is ``weight_for_input``, and weight/bias gradients of the copy with its own weight."""
    ref = copy.deepcopy(module)
    xi = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        ref.weight.copy_(weight_for_input)
    (ref(xi) * readout).sum().backward()
    own = copy.deepcopy(module)
    own.zero_grad()
    (own(x.detach()) * readout).sum().backward()
    return xi.grad, own.weight.grad, None if own.bias is None else own.bias.grad


CASES = {
    "linear-3d": (lambda: nn.Linear(5, 4), (2, 3, 5)),
    "linear-1d": (lambda: nn.Linear(5, 4, bias=False), (5,)),
    "conv1d-stride-dil": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (2, 4, 11)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4), (2, 4, 7, 6)),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 5, (3, 2), padding=(1, 2), padding_mode="reflect"), (2, 3, 6, 5)),
    "conv2d-circular": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", bias=False), (1, 3, 5, 5)),
    "conv2d-replicate": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="replicate"), (2, 2, 7, 7)),
    "conv2d-same-even": (lambda: nn.Conv2d(3, 4, 4, padding="same", dilation=1), (2, 3, 6, 7)),
    "conv2d-valid": (lambda: nn.Conv2d(3, 4, 3, padding="valid"), (2, 3, 6, 6)),
    "conv2d-unbatched": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1, groups=2), (2, 2, 4, 5, 4)),
    "conv2dsame-timm": (lambda: Conv2dSame(3, 4, 3, stride=2), (2, 3, 7, 8)),
    "convT1d-groups-outpad": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
                              (2, 4, 5)),
    "convT2d-dilated": (lambda: nn.ConvTranspose2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
                        (2, 3, 5, 4)),
    "convT3d-unbatched": (lambda: nn.ConvTranspose3d(2, 3, 2, stride=2, bias=False), (2, 3, 3, 3)),
}


@pytest.mark.parametrize("mode", ["fa", "usf", "frsf", "urfb"])
@pytest.mark.parametrize("case", list(CASES))
def test_input_gradient_uses_feedback_and_weight_gradient_is_backprops(case, mode):
    make, shape = CASES[case]
    layer = make()
    plain = copy.deepcopy(layer)
    handle = fb.convert(layer, mode)
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    readout = torch.randn_like(out)
    (out * readout).sum().backward()
    B = handle.feedback_weight("")
    ref_x, ref_w, ref_b = _grads_through(plain, x, B, readout)
    bp_x, _, _ = _grads_through(plain, x, plain.weight.detach(), readout)
    torch.testing.assert_close(x.grad, ref_x)
    assert (x.grad - bp_x).abs().max() > 1e-3, "the input gradient must differ from backprop's"
    torch.testing.assert_close(layer.weight.grad, ref_w)
    if ref_b is not None:
        torch.testing.assert_close(layer.bias.grad, ref_b)
    if mode == "urfb":  # B receives exactly W's gradient
        torch.testing.assert_close(layer.feedback_weight.grad, ref_w)
    torch.testing.assert_close(out.detach(), plain(x.detach()))


@given(
    dims=st.integers(1, 3), groups=st.sampled_from([1, 2]), stride=st.integers(1, 2), padding=st.integers(0, 2),
    dilation=st.integers(1, 2), kernel=st.integers(1, 3), bias=st.booleans(), transposed=st.booleans(),
)
def test_conv_input_gradient_property(dims, groups, stride, padding, dilation, kernel, bias, transposed):
    if transposed:
        conv = getattr(nn, f"ConvTranspose{dims}d")(2 * groups, 3 * groups, kernel, stride, padding,
                                                     groups=groups, bias=bias, dilation=dilation)
    else:
        conv = getattr(nn, f"Conv{dims}d")(2 * groups, 3 * groups, kernel, stride, padding, dilation, groups, bias)
    plain = copy.deepcopy(conv)
    handle = fb.convert(conv, "fa")
    x = torch.randn(2, 2 * groups, *([7] * dims), requires_grad=True)
    out = conv(x)
    readout = torch.randn_like(out)
    (out * readout).sum().backward()
    ref_x, ref_w, _ = _grads_through(plain, x, handle.feedback_weight(""), readout)
    torch.testing.assert_close(x.grad, ref_x)
    torch.testing.assert_close(conv.weight.grad, ref_w)
    handle.remove()


def test_conv_transpose_called_with_output_size():
    """output_size changes the call's output_padding; the feedback backward must follow it."""
    layer = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)
    plain = copy.deepcopy(layer)
    handle = fb.convert(layer, "fa")
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = layer(x, output_size=[8, 10])  # output_padding (1, 1), against (0, 0) without output_size
    assert out.shape[-2:] == (8, 10)
    readout = torch.randn_like(out)
    (out * readout).sum().backward()
    ref = copy.deepcopy(plain)
    with torch.no_grad():
        ref.weight.copy_(handle.feedback_weight(""))
    xi = x.detach().clone().requires_grad_(True)
    (ref(xi, output_size=[8, 10]) * readout).sum().backward()
    (plain(x.detach(), output_size=[8, 10]) * readout).sum().backward()
    torch.testing.assert_close(x.grad, xi.grad)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad)


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
    )


def _train(model, steps, lr=0.05, momentum=0.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_urfb_initialised_to_w_reproduces_backprop_over_steps():
    plain = _net()
    conv = copy.deepcopy(plain)
    fb.convert(conv, "urfb", init="weight")
    ref_losses = _train(plain, 4, momentum=0.9)
    losses = _train(conv, 4, momentum=0.9)
    assert losses == pytest.approx(ref_losses, rel=1e-10, abs=1e-12)
    converted = dict(conv.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(converted[name], p)
        if name.endswith("weight") and name.replace("weight", "feedback_weight") in converted:
            torch.testing.assert_close(converted[name.replace("weight", "feedback_weight")], p)


@pytest.mark.parametrize("x_needs_grad", [True, False])
@pytest.mark.parametrize("mode", ["urfb", "kp"])
def test_trainable_feedback_takes_delta_x_once_for_w_and_b(mode, x_needs_grad):
    """urfb and kp give W and B the one product delta x^T (plus decay * W and decay * B for kp), in
    tensors of their own, and b its sum of delta: one weight-gradient convolution per layer, beside the
    input gradient's, where W and B each taking their own would run two (the layer's own backward and B's)."""
    from torch.profiler import profile

    decay = 0.1
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    plain = copy.deepcopy(layer)
    handle = fb.convert(layer, mode, **({"weight_decay": decay} if mode == "kp" else {}))
    x = torch.randn(2, 3, 7, 6, requires_grad=x_needs_grad)
    out = layer(x)
    readout = torch.randn_like(out)
    with profile() as prof:
        (out * readout).sum().backward()
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::convolution_backward")
    assert calls == (2 if x_needs_grad else 1)
    _, ref_w, ref_b = _grads_through(plain, x, plain.weight.detach(), readout)
    B = handle.feedback_weight("")
    k = decay if mode == "kp" else 0.0
    torch.testing.assert_close(layer.weight.grad, ref_w + k * plain.weight.detach())
    torch.testing.assert_close(layer.feedback_weight.grad, ref_w + k * B)
    torch.testing.assert_close(layer.bias.grad, ref_b)
    assert layer.weight.grad.data_ptr() != layer.feedback_weight.grad.data_ptr()


@pytest.mark.parametrize("mode", ["urfb", "kp", "fa"])
def test_trainable_feedback_lets_the_layers_own_graph_go_in_the_forward(mode):
    """Where W and B share the product (urfb, kp) the output has no edge back to the layer's own graph,
    so nothing keeps what it saved (an untied layer's input patches) until the backward; fa still
    passes delta on to it for W's gradient."""
    layer = fb.LocallyConnected2d(2, 3, input_size=(5, 5), kernel_size=3)
    fb.convert(layer, mode)
    out = layer(torch.randn(2, 2, 5, 5, requires_grad=True))
    to_layer = out.grad_fn.next_functions[0][0]  # where delta goes for the output the Function got
    if mode == "fa":
        assert to_layer is not None
    else:
        assert to_layer is None
        out.sum().backward()
        assert layer.weight.grad is not None and layer.feedback_weight.grad is not None and layer.bias.grad is not None


def _differences(model):
    return {n: (m.weight - m.feedback_weight).detach().clone() for n, m in fb.converted_layers(model).items()}


def test_w_minus_b_constant_under_urfb_and_shrinking_under_kp():
    model = _net()
    fb.convert(model, "urfb")
    before = _differences(model)
    b0 = model[0].feedback_weight.detach().clone()
    _train(model, 3)
    for n, d in _differences(model).items():
        torch.testing.assert_close(d, before[n])
    assert (model[0].feedback_weight - b0).abs().max() > 1e-4, "B must have been updated"

    model = _net()
    lr, decay, steps = 0.05, 0.1, 3
    fb.convert(model, "kp", weight_decay=decay)
    before = _differences(model)
    _train(model, steps, lr=lr)
    for n, d in _differences(model).items():
        torch.testing.assert_close(d, before[n] * (1 - lr * decay) ** steps)


def test_fixed_modes_keep_their_feedback_and_brsf_redraws():
    model = _net()
    h = fb.convert(model, "frsf")
    m0 = model[0].feedback_magnitude.clone()
    _train(model, 2)
    torch.testing.assert_close(model[0].feedback_magnitude, m0)
    B = h.feedback_weight("0")
    assert torch.equal(torch.sign(B), torch.sign(model[0].weight.detach()))
    h.remove()
    h = fb.convert(model, "brsf")
    m0 = model[0].feedback_magnitude.clone()
    _train(model, 1)
    assert not torch.equal(model[0].feedback_magnitude, m0)
    model.eval()
    m1 = model[0].feedback_magnitude.clone()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert torch.equal(model[0].feedback_magnitude, m1), "no redraw in eval mode"


def test_bp_mode_is_backprop_and_usf_is_sign_concordant():
    plain, conv = _net(), None
    conv = copy.deepcopy(plain)
    fb.convert(conv, "bp")
    assert _train(conv, 3) == pytest.approx(_train(plain, 3), rel=1e-10)
    usf = copy.deepcopy(plain)
    h = fb.convert(usf, "usf")
    w = usf[6].weight.detach().double()
    n = w.numel()
    std = (((w - w.sum() / n) ** 2).sum() / (n - 1)).sqrt()  # the standard deviation of W at conversion
    ref = torch.sign(w) * std
    torch.testing.assert_close(h.feedback_weight("6").double(), ref, rtol=1e-6, atol=1e-9)


def test_state_dict_round_trip_keys_and_remove():
    torch.manual_seed(0)
    model = _net()
    keys = list(model.state_dict())
    h = fb.convert(model, "fa")
    new_keys = set(model.state_dict()) - set(keys)
    assert list(model.state_dict())[: len(keys)] == keys or set(keys) <= set(model.state_dict())
    assert new_keys == {"0.feedback_weight", "3.feedback_weight", "6.feedback_weight"}
    _train(model, 1)
    saved = copy.deepcopy(model.state_dict())
    torch.manual_seed(123)
    other = _net()
    fb.convert(other, "fa")
    other.load_state_dict(saved)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    model(x).sum().backward()
    other(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    h.remove()
    assert list(model.state_dict()) == keys
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    plain = copy.deepcopy(model)
    x3 = x.detach().clone().requires_grad_(True)
    x4 = x.detach().clone().requires_grad_(True)
    model(x3).sum().backward()
    plain(x4).sum().backward()
    torch.testing.assert_close(x3.grad, x4.grad)


def test_targets_select_layers_like_attach():
    model = _net()
    h = fb.convert(model, "fa", targets=["6", nn.Conv2d])
    assert list(h.layers) == ["0", "3", "6"]
    h.remove()
    h = fb.convert(model, "urfb", targets="6")
    assert list(h.layers) == ["6"] and h.feedback_parameters() == [model[6].feedback_weight]
    assert not hasattr(model[0], "feedback_weight")
    h.remove()


def _unchanged(model, keys):
    assert list(model.state_dict()) == keys
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_bad_input_gives_clear_errors_and_changes_nothing():
    model = _net()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="unknown feedback mode 'feedbak'.*fa, usf"):
        fb.convert(model, "feedbak")
    with pytest.raises(ValueError, match="weight_decay.*'kp'"):
        fb.convert(model, "fa", weight_decay=0.1)
    with pytest.raises(ValueError, match="init returned shape"):
        fb.convert(model, "fa", init=lambda w: torch.zeros(3))
    with pytest.raises(ValueError, match="matched no module.*0 \\(Conv2d\\)"):
        fb.convert(model, "fa", targets="nonexistent")
    _unchanged(model, keys)

    normed = nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 3, 3))
    mixed = nn.Sequential(OrderedDict(plain=nn.Conv2d(3, 4, 3), normed=normed, std=StdConv2d(3, 4, 3)))
    keys = list(mixed.state_dict())
    with pytest.raises(ValueError, match="(?s)cannot be converted to feedback learning:.*normed: ParametrizedConv2d "
                                         "has a parametrized weight.*std: StdConv2d overrides forward"):
        fb.convert(mixed, "fa")
    _unchanged(mixed, keys)
    h = fb.convert(mixed, "fa", targets="plain")
    with pytest.raises(ValueError, match="already converted"):
        fb.convert(mixed, "usf", targets="plain")
    h.remove()
    with pytest.raises(ValueError, match="no layer that can be converted"):
        fb.convert(nn.ReLU(), "fa")


@pytest.mark.parametrize("mode", ["fa", "urfb"])
def test_autocast_bfloat16_gradient_close_to_float64_reference(mode):
    torch.set_default_dtype(torch.float32)
    if True:
        conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        plain = copy.deepcopy(conv).double()
        h = fb.convert(conv, mode)
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert x.grad.dtype == torch.float32 and conv[0].weight.grad.dtype == torch.float32
        # reference: float64 backprop with the feedback weights in place of W for the input path
        xr = x.detach().double().requires_grad_(True)
        B0, B2 = h.feedback_weight("0").double(), h.feedback_weight("2").double()
        z0 = F.conv2d(xr, plain[0].weight.detach(), plain[0].bias, padding=1)
        delta = plain[2].weight.new_ones(2, 3)
        d_flat = delta @ B2  # feedback through the linear layer
        ref = torch.autograd.grad(F.conv2d(xr, B0, None, padding=1), xr, d_flat.reshape(z0.shape))[0]
        torch.testing.assert_close(x.grad.double(), ref, rtol=0.05, atol=0.05)
        w0 = plain[0].weight.detach().requires_grad_(True)
        b0 = plain[0].bias.detach().requires_grad_(True)
        ref_w, ref_b = torch.autograd.grad(F.conv2d(xr.detach(), w0, b0, padding=1), (w0, b0), d_flat.reshape(z0.shape))
        torch.testing.assert_close(conv[0].weight.grad.double(), ref_w, rtol=0.05, atol=0.05)
        torch.testing.assert_close(conv[0].bias.grad.double(), ref_b, rtol=0.05, atol=0.05)
        if mode == "urfb":  # B takes W's gradient, in its own dtype
            assert conv[0].feedback_weight.grad.dtype == torch.float32
            torch.testing.assert_close(conv[0].feedback_weight.grad.double(), ref_w, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("mode", ["fa", "urfb"])
def test_pruned_layer_gets_masked_weight_gradient_and_feedback_input_gradient(mode):
    conv = nn.Conv2d(3, 4, 3, padding=1)
    torch.nn.utils.prune.l1_unstructured(conv, "weight", amount=0.5)
    plain = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
        plain.bias.copy_(conv.bias)
    h = fb.convert(conv, mode)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    out = conv(x)
    readout = torch.randn_like(out)
    (out * readout).sum().backward()
    ref_x, ref_w, ref_b = _grads_through(plain, x, h.feedback_weight(""), readout)
    torch.testing.assert_close(x.grad, ref_x)
    torch.testing.assert_close(conv.weight_orig.grad, ref_w * conv.weight_mask)
    torch.testing.assert_close(conv.bias.grad, ref_b)
    if mode == "urfb":  # B is not pruned: it takes the whole product
        torch.testing.assert_close(conv.feedback_weight.grad, ref_w)
