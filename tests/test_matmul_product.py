"""The Hebbian product of a convolution as one matrix product with its input patches
(hebbloss.layers.conv.takes_matmul), and attach taking it at once where it applies.

Every product is compared in float64 with tests/reference.py (decay S = 0 gives sum y x alone).
"""
import pytest
import torch
from torch import nn

import hebbloss
from hebbloss.layers import conv as conv_layers
from reference import D, layer_update, rule_update

TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture
def matmuls(monkeypatch, spy):
    """Every weight large enough for the matrix product; the list of its calls, by units."""
    monkeypatch.setattr(conv_layers, "MATMUL_WEIGHT_BYTES", 0)
    return spy(conv_layers, "_matmul_weight_grad", lambda db, *rest: db.shape[1])


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(3, 40, 3), (2, 3, 5, 5)),
    (lambda: nn.Conv2d(3, 40, 3, stride=2, padding=1, dilation=1), (2, 3, 7, 6)),
    (lambda: nn.Conv2d(2, 64, (2, 3), padding=(1, 2), dilation=(2, 1)), (1, 2, 5, 6)),
    (lambda: nn.Conv2d(2, 64, 3, padding=1, padding_mode="reflect"), (2, 2, 4, 4)),
    (lambda: nn.Conv2d(2, 64, 3, padding="same", padding_mode="circular"), (2, 2, 4, 5)),
    (lambda: nn.Conv1d(3, 25, 3, stride=2), (3, 3, 9)),
    (lambda: nn.Conv3d(2, 40, 2, padding=1), (1, 2, 2, 2, 3)),
    (lambda: nn.Conv2d(3, 40, 3), (3, 5, 5)),  # unbatched
    # 20 x 2 x 2 positions for 64 units: in batch chunks of 16 and 4 samples (64 units >= 16 x 4 positions)
    (lambda: nn.Conv2d(3, 64, 3), (20, 3, 4, 4)),
    (lambda: nn.Conv2d(2, 64, 3, padding=1, padding_mode="reflect"), (40, 2, 2, 2)),  # chunks of 16, 16, 8
])
def test_matmul_product_equals_the_float64_reference(matmuls, make, shape):
    torch.manual_seed(0)
    layer = make().to(D)
    x = torch.randn(shape, dtype=D)
    with torch.no_grad():
        y = torch.randn_like(layer(x))
    kind = hebbloss.layers.layer_type_of(layer)
    adjoint = kind.adjoint(layer, x, y)
    assert conv_layers.takes_matmul(y, layer.weight, adjoint.geom), "few positions for the units: the product applies"
    got = adjoint.weight_grad(y, x, layer.weight)
    batched = x.dim() == layer.weight.dim()
    xb, yb = (x, y) if batched else (x.unsqueeze(0), y.unsqueeze(0))
    expected, _ = layer_update(layer, xb, yb, torch.zeros(yb.shape[1], dtype=D))
    assert matmuls, "the matrix product was not taken"
    torch.testing.assert_close(got, expected, **TOL)


def test_the_kernel_serves_where_positions_outnumber_units_or_the_layer_is_grouped_or_transposed(matmuls):
    y = torch.randn(2, 8, 5, 5)  # 50 positions, 8 units
    geom = hebbloss.layers.conv.ConvGeometry(dims=2, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    assert not conv_layers.takes_matmul(y, torch.randn(8, 3, 3, 3), geom)
    few = torch.randn(1, 40, 2, 2)  # 4 positions, 40 units
    assert conv_layers.takes_matmul(few, torch.randn(40, 3, 3, 3), geom)
    many = torch.randn(30, 64, 2, 2)  # 120 positions for 64 units, but 16 x 4 positions a sample <= 64 units
    assert conv_layers.takes_matmul(many, torch.randn(64, 3, 3, 3), geom)
    wide = torch.randn(30, 63, 2, 2)  # 16 x 4 positions a sample > 63 units
    assert not conv_layers.takes_matmul(wide, torch.randn(63, 3, 3, 3), geom)
    assert not conv_layers.takes_matmul(few.half(), torch.randn(40, 3, 3, 3).half(), geom)
    grouped = hebbloss.layers.conv.ConvGeometry(dims=2, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=2)
    assert not conv_layers.takes_matmul(few, torch.randn(40, 2, 3, 3), grouped)
    transposed = hebbloss.layers.conv.ConvGeometry(dims=2, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                                                   transposed=True)
    assert not conv_layers.takes_matmul(few, torch.randn(40, 3, 3, 3), transposed)


def test_default_threshold_keeps_small_layers_on_the_kernel():
    geom = hebbloss.layers.conv.ConvGeometry(dims=2, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    assert not conv_layers.takes_matmul(torch.randn(1, 40, 2, 2), torch.randn(40, 3, 3, 3), geom)


@pytest.mark.parametrize("rule", ["oja", "softhebb"])
@pytest.mark.parametrize("streaming", [False, True])
def test_attach_takes_a_small_signal_of_a_large_layer_at_once_by_the_matrix_product(matmuls, rule, streaming):
    """y (2 x 40 x 2 x 2) is smaller than the weight (40 x 3 x 3 x 3): without the matrix product its
    Hebbian half would wait for the backward; with it, it is taken in the hook, and the gradients are
    minus the float64 rule update. A second layer whose positions outnumber its units keeps the kernel."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Conv2d(40, 4, 1))
    x = torch.randn(2, 3, 4, 4)
    plastic = hebbloss.attach(net, rule=rule, post="relu", streaming=streaming)
    net(x)
    records = [r for rs in plastic.records.values() for r in rs]
    assert records[0].term.hebbian and records[0].term.post is None  # taken at once
    loss = plastic.loss()
    loss.backward()
    assert matmuls == [40]
    with torch.no_grad():
        z1 = net[0](x)
        z2 = net[2](net[1](z1))
    expected_loss = torch.zeros((), dtype=D)
    for layer, inp, z in ((net[0], x, z1), (net[2], net[1](z1), z2)):
        y, z = torch.relu(z).to(D), z.to(D)
        dW, db = rule_update(layer, inp.to(D), y, z, rule)
        torch.testing.assert_close(layer.weight.grad.to(D), -dW, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.bias.grad.to(D), -db, rtol=1e-5, atol=1e-5)
        S = (y * y if rule == "oja" else y * z).sum(dim=(0, 2, 3))
        w, b = layer.weight.detach().to(D), layer.bias.detach().to(D)
        expected_loss += -(y * z).sum() + 0.5 * (S * (w.flatten(1).square().sum(1) + b * b)).sum()
    torch.testing.assert_close(loss.to(D), expected_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, D])
@pytest.mark.parametrize("batch", [1, 5])
def test_a_channels_last_1x1_convolution_takes_the_product_of_two_views(dtype, batch, spy):
    """A 1x1 convolution on channels-last tensors (timm convnext's MLP): one matrix product, whatever the
    weight's size, equal to the float64 reference; an NCHW input, a stride, padding or a larger kernel
    keep the kernel (the default threshold stands)."""
    calls = spy(conv_layers, "_matmul_weight_grad", lambda *args: 1)
    torch.manual_seed(3)
    layer = nn.Conv2d(6, 9, 1).to(dtype)
    x = torch.randn(batch, 6, 5, 4, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = torch.relu(layer(x))
    assert y.is_contiguous(memory_format=torch.channels_last)
    adjoint = hebbloss.layers.layer_type_of(layer).adjoint(layer, x, y)
    got = adjoint.weight_grad(y, x, layer.weight)
    assert calls == [1]
    expected, _ = layer_update(layer.to(D), x.to(D), y.to(D), torch.zeros(9, dtype=D))
    tol = TOL if dtype == D else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.to(D), expected, **tol)
    for other, inp in ((nn.Conv2d(6, 9, 1), x.contiguous()), (nn.Conv2d(6, 9, 1, stride=2), x),
                       (nn.Conv2d(6, 9, 1, padding=1), x), (nn.Conv2d(6, 9, 3, padding=1), x)):
        other = other.to(dtype)
        with torch.no_grad():
            out = other(inp)
        adjoint = hebbloss.layers.layer_type_of(other).adjoint(other, inp, out)
        calls.clear()
        adjoint.weight_grad(out, inp, other.weight)
        assert calls == [], other
