"""The Hebbian product of a depthwise convolution as a forward depthwise convolution of its input by
its post signal (hebbloss.layers.conv.takes_depthwise_correlation), against the float64 reference
(tests/reference.py; decay S = 0 gives sum y x alone)."""
import pytest
import torch
from torch import nn

import hebbloss
from hebbloss.layers import conv as conv_layers
from reference import D, layer_update, rule_update


@pytest.fixture
def correlations(spy):
    """The calls of the depthwise correlation, by channels."""
    return spy(conv_layers, "_depthwise_weight_grad", lambda db, *rest: db.shape[1])


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(6, 6, 7, padding=3, groups=6), (3, 6, 9, 8)),
    (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), (2, 4, 8, 7)),  # the last row and column drop
    (lambda: nn.Conv2d(4, 4, (3, 2), stride=(2, 1), dilation=(2, 3), groups=4), (2, 4, 11, 9)),
    (lambda: nn.Conv2d(5, 5, 4, padding="same", groups=5), (2, 5, 6, 6)),  # asymmetric explicit pads
    (lambda: nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect", groups=3), (2, 3, 5, 4)),
    (lambda: nn.Conv1d(4, 4, 5, stride=2, padding=2, groups=4), (3, 4, 13)),
    (lambda: nn.Conv3d(3, 3, 3, padding=1, groups=3), (2, 3, 4, 5, 3)),
    (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 5, 7)),  # unbatched
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_product_equals_the_float64_reference(correlations, make, shape, channels_last):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = torch.randn_like(layer(x))
    kind = hebbloss.layers.layer_type_of(layer)
    adjoint = kind.adjoint(layer, x, y)
    assert conv_layers.takes_depthwise_correlation(y, layer.weight, adjoint.geom)
    got = adjoint.weight_grad(y, x, layer.weight)
    assert correlations, "the depthwise correlation was not taken"
    batched = x.dim() == layer.weight.dim()
    xb, yb = (x, y) if batched else (x.unsqueeze(0), y.unsqueeze(0))
    expected, _ = layer_update(layer.to(D), xb.to(D), yb.to(D), torch.zeros(yb.shape[1], dtype=D))
    assert got.dtype == torch.float32 and got.shape == layer.weight.shape
    torch.testing.assert_close(got.to(D), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_the_kernel_serves_other_groupings_and_dtypes(correlations):
    geom = hebbloss.layers.conv.ConvGeometry(dims=2, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=4)
    y = torch.randn(2, 4, 5, 5)
    assert conv_layers.takes_depthwise_correlation(y, torch.randn(4, 1, 3, 3), geom)
    assert not conv_layers.takes_depthwise_correlation(y.double(), torch.randn(4, 1, 3, 3).double(), geom)
    assert not conv_layers.takes_depthwise_correlation(y.bfloat16(), torch.randn(4, 1, 3, 3).bfloat16(), geom)
    y8 = torch.randn(2, 8, 5, 5)  # a depth multiplier of 2: two units per input channel
    assert not conv_layers.takes_depthwise_correlation(y8, torch.randn(8, 1, 3, 3), geom)
    grouped = hebbloss.layers.conv.ConvGeometry(dims=2, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2)
    assert not conv_layers.takes_depthwise_correlation(y, torch.randn(4, 2, 3, 3), grouped)
    plain = hebbloss.layers.conv.ConvGeometry(dims=2, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    assert not conv_layers.takes_depthwise_correlation(torch.randn(2, 1, 5, 5), torch.randn(1, 1, 3, 3), plain)


@pytest.mark.parametrize("rule", ["oja", "softhebb"])
@pytest.mark.parametrize("streaming", [False, True])
def test_attach_on_a_depthwise_layer_gives_minus_the_float64_update(correlations, rule, streaming):
    """A float32 depthwise layer (with bias) trained by attach: its gradients are minus the float64 rule update."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(5, 5, 7, padding=3, groups=5), nn.ReLU())
    x = torch.randn(4, 5, 9, 9).contiguous(memory_format=torch.channels_last)
    plastic = hebbloss.attach(net, rule=rule, post="relu", streaming=streaming)
    net(x)
    plastic.loss().backward()
    assert correlations
    layer = net[0]
    with torch.no_grad():
        z = layer(x).to(D)
    dW, db = rule_update(layer.to(D), x.to(D), torch.relu(z), z, rule)
    torch.testing.assert_close(layer.weight.grad.to(D), -dW, rtol=1e-4, atol=1e-4 * float(dW.abs().max()))
    torch.testing.assert_close(layer.bias.grad.to(D), -db, rtol=1e-4, atol=1e-4 * float(db.abs().max()))
