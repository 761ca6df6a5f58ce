"""untie() carries a converted layer's feedback (its B or M, its mode, its handle) over to the untied
layer: the untied network starts as the tied one, in its backward pass too (Amit 2019)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hebbloss import feedback as fb

pytestmark = pytest.mark.usefixtures("float64_default")  # the references below are float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2), nn.Flatten())




@pytest.mark.parametrize("mode", ["fa", "frsf", "urfb", "kp", "usf", "bp"])
def test_untie_carries_feedback_and_keeps_the_input_gradient(mode):
    model = _model()
    handle = fb.convert(model, mode, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    delta = torch.randn(2, 4 * 2 * 2)
    B = [handle.feedback_weight("0").clone(), handle.feedback_weight("2").clone()]
    (model(x) * delta).sum().backward()
    tied = x.grad.clone()

    # float64 reference written out: delta back through conv2 with B2, tanh', conv1 with B1
    with torch.no_grad():
        h1 = F.conv2d(x, model[0].weight, model[0].bias, padding=1)
    d2 = delta.reshape(2, 4, 2, 2)
    g_a1 = torch.nn.grad.conv2d_input(h1.shape, B[1], d2, stride=2)
    g_h1 = g_a1 * (1 - torch.tanh(h1) ** 2)
    reference = torch.nn.grad.conv2d_input(x.shape, B[0], g_h1, padding=1)
    torch.testing.assert_close(tied, reference)

    scale_before = model[2].feedback_scale.item() if mode == "usf" else None
    new = fb.untie(model, (2, 6, 6))
    assert set(new) == {"0", "2"} and fb.converted_layers(model) == {"0": model[0], "2": model[2]}
    assert handle.layers == {"0": model[0], "2": model[2]}
    if mode == "usf":  # its fixed scale is one number per layer, carried over unchanged
        assert model[2].feedback_scale.shape == () and model[2].feedback_scale.item() == scale_before
    elif handle.mode.entry is not None:
        stored = getattr(model[2], handle.mode.entry)
        assert stored.shape == model[2].weight.shape == (2, 2, 4, 3, 3, 3)
        assert isinstance(stored, nn.Parameter) == (mode in ("urfb", "kp"))
    for name, b in zip(("0", "2"), B):
        untied_b = handle.feedback_weight(name)  # replicated at every output position
        for i in range(untied_b.shape[0]):
            for j in range(untied_b.shape[1]):
                torch.testing.assert_close(untied_b[i, j], b)
    x.grad = None
    (model(x) * delta).sum().backward()
    torch.testing.assert_close(x.grad, reference)
    handle.remove()
    assert not any(hasattr(model[2], n) for n in ("feedback_weight", "feedback_magnitude", "feedback_scale"))
    assert fb.converted_layers(model) == {}


def test_untie_carries_a_trainable_b_that_then_learns_per_position():
    model = _model()
    handle = fb.convert(model, "urfb", init="weight")
    fb.untie(model, (2, 6, 6))
    assert [p is model[2].feedback_weight for p in handle.feedback_parameters()] == [False, True]
    x = torch.randn(2, 2, 6, 6)
    model(x).sum().backward()
    torch.testing.assert_close(model[2].feedback_weight.grad, model[2].weight.grad)  # urfb: B gets W's gradient


def test_untie_leaves_unconverted_layers_unconverted():
    model = _model()
    handle = fb.convert(model, "fa", targets=["2"])
    fb.untie(model, (2, 6, 6))
    assert fb.converted_layers(model) == {"2": model[2]} and not hasattr(model[0], "feedback_weight")
    handle.remove()
