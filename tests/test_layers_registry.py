"""The layer-family registry: resolution through the class hierarchy, refusal of subclasses that
change forward, registering a new family with the decorator (its surrogate gradient and its
feedback adjoint against float64 references written here), and why_unsupported / is_pruned."""
import pytest
import timm.layers
import torch
from torch import nn
from torch.nn.utils import prune

import hebbloss
from hebbloss import layers
from reference import D, layer_update

torch.manual_seed(0)


class ScaledInput(nn.Conv2d):
    """Overrides forward: its output is not W*x + b in its input."""

    def forward(self, x):
        return super().forward(2 * x)


class NamedConv(nn.Conv2d):
    """A subclass that only adds a name: computes exactly as nn.Conv2d."""

    label = "mine"


def test_a_subclass_overriding_forward_is_refused_by_name_and_can_be_declared_linear():
    reason = layers.why_unsupported(ScaledInput(3, 4, 3))
    assert "ScaledInput overrides forward() of Conv2d" in reason
    with pytest.raises(layers.UnsupportedLayer, match="ScaledInput overrides forward"):
        layers.layer_type_of(ScaledInput(3, 4, 3))
    with pytest.raises(ValueError, match=r"  - 1: ScaledInput overrides forward\(\) of Conv2d"):
        hebbloss.attach(nn.Sequential(nn.Linear(3, 3), ScaledInput(3, 4, 3)))

    class Declared(nn.Conv2d):  # overrides forward, but computes W*x + b: the advice in the reason applies
        def forward(self, x):
            return super().forward(x)

    reason = layers.why_unsupported(Declared(3, 4, 3))
    advice = reason.split("register it: ")[1]
    assert advice == "hebbloss.layers.register(Declared, layer_type=hebbloss.layers.conv.Convolution())"
    eval(advice, {"hebbloss": hebbloss, "Declared": Declared})
    assert layers.why_unsupported(Declared(3, 4, 3)) is None
    assert layers.layer_type_of(Declared(3, 4, 3, bias=False)).name == "conv2d"


def test_a_subclass_that_keeps_forward_resolves_to_its_parents_family():
    conv = NamedConv(2, 3, 3, padding=1).double()
    assert layers.why_unsupported(conv) is None
    kind = layers.layer_type_of(conv)
    assert (kind.name, kind.spatial_dims, kind.transposed) == ("conv2d", 2, False)
    assert layers.layer_type_of(nn.ConvTranspose3d(2, 3, 1)).name == "conv_transpose3d"
    plastic = hebbloss.attach(conv, rule="hebb")
    x = torch.randn(2, 2, 5, 5, dtype=D)
    z = conv(x)
    plastic.loss().backward()
    dW, db = layer_update(conv, x, z.detach(), torch.zeros(3, dtype=D))
    torch.testing.assert_close(conv.weight.grad, -dW)
    torch.testing.assert_close(conv.bias.grad, -db)
    plastic.remove()


def test_timm_layers_resolve_by_name_without_being_imported_by_hebbloss():
    same = timm.layers.Conv2dSame(3, 4, 3, stride=2)
    assert layers.layer_type_of(same).name == "conv2d_same"
    assert layers.layer_type_of(timm.layers.Linear(3, 4)).name == "linear"
    for refused in (timm.layers.StdConv2d(3, 4, 3), timm.layers.ScaledStdConv2d(3, 4, 3)):
        assert f"{type(refused).__name__} overrides forward() of Conv2d" in layers.why_unsupported(refused)

    class SameChild(timm.layers.Conv2dSame):  # found through the hierarchy by timm's qualified name
        pass

    assert layers.layer_type_of(SameChild(3, 4, 3)).name == "conv2d_same"


def test_post_channel_dim_and_channel_dim_come_from_the_family():
    assert layers.layer_type_of(nn.Linear(3, 4)).post_channel_dim == -1
    assert layers.layer_type_of(nn.Conv1d(3, 4, 1)).post_channel_dim == 1
    assert layers.layer_type_of(nn.Conv3d(3, 4, 1)).channel_dim(torch.zeros(4, 2, 2, 2)) == 0  # unbatched
    assert layers.layer_type_of(nn.Linear(3, 4)).channel_dim(torch.zeros(2, 5, 4)) == 2


def test_is_pruned_and_why_unsupported():
    conv = nn.Conv2d(3, 4, 3)
    assert not layers.is_pruned(conv)
    prune.l1_unstructured(conv, "weight", amount=0.5)
    assert layers.is_pruned(conv)
    assert layers.why_unsupported(conv) is None  # weight is no longer a Parameter, weight_orig is
    assert layers.plastic_weight(conv) is conv.weight_orig
    prune.remove(conv, "weight")
    assert not layers.is_pruned(conv) and layers.plastic_weight(conv) is conv.weight

    assert "BatchNorm1d is not a registered layer type" in layers.why_unsupported(nn.BatchNorm1d(3))
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(3, 3))
    assert "parametrized weight" in layers.why_unsupported(normed)
    assert "no weight Parameter" in layers.why_unsupported(_DerivedWeight())
    lc = hebbloss.feedback.LocallyConnected2d(2, 3, 5, 3)
    assert "LocallyConnected2d cannot be made plastic" in layers.why_unsupported(lc)
    assert layers.why_unsupported(lc, "feedback") is None
    assert layers.layer_type_of(lc, "feedback").post_channel_dim == 1
    with pytest.raises(ValueError, match="purpose must be one of 'plastic', 'feedback', got 'probe'"):
        layers.why_unsupported(lc, "probe")


class _DerivedWeight(nn.Linear):
    def __init__(self):
        super().__init__(3, 3)
        w = self.weight.detach().clone()
        del self.weight
        self.weight = w


# --------------------------------------------------------------------------- a new family


class TransposedLinear(nn.Module):
    """A Linear whose weight is stored [in, out] (as GPT-2's Conv1D): z = x W + b."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class _TransposedAdjoint:
    @staticmethod
    def input_grad(delta, x, feedback):
        return (delta @ feedback.to(delta.dtype).t()).to(x.dtype)

    @staticmethod
    def weight_grad(delta, x, feedback):
        return (x.to(delta.dtype).t() @ delta).to(feedback.dtype)


@layers.register(TransposedLinear)
class TransposedLinearFamily(layers.LayerType):
    """Units are the last output dimension; weight [in, out] is a transposed layout (groups = 1)."""

    name, spatial_dims, transposed = "transposed_linear", 0, True

    def adjoint(self, module, x, output):
        return _TransposedAdjoint


def test_a_family_registered_with_the_decorator_gets_its_rule_update():
    model = nn.Sequential(TransposedLinear(5, 4), nn.Tanh(), TransposedLinear(4, 3)).double()
    assert [f for _, f in hebbloss.validate(model).chosen] == ["transposed_linear"] * 2
    plastic = hebbloss.attach(model, rule="oja", post=torch.tanh)
    x = torch.randn(6, 5, dtype=D)
    h = torch.tanh(x @ model[0].weight.detach() + model[0].bias.detach())
    model(x)
    plastic.loss().backward()
    for layer, inp in ((model[0], x), (model[2], h)):  # Oja, written plainly for weight [in, out]
        W, b = layer.weight.detach(), layer.bias.detach()
        y = torch.tanh(inp @ W + b)
        S = (y * y).sum(0)  # [out]
        dW = inp.t() @ y - W * S  # [in, out]: unit c is column c
        db = y.sum(0) - S * b
        torch.testing.assert_close(layer.weight.grad, -dW)
        torch.testing.assert_close(layer.bias.grad, -db)
    plastic.remove()


def test_a_family_registered_with_the_decorator_serves_the_feedback_modes():
    model = nn.Sequential(TransposedLinear(5, 4), nn.Tanh(), TransposedLinear(4, 3)).double()
    handle = hebbloss.feedback.convert(model, "fa")
    x = torch.randn(6, 5, dtype=D, requires_grad=True)
    model(x).sum().backward()
    W0, b0, W2, B2 = (t.detach() for t in (model[0].weight, model[0].bias, model[2].weight,
                                           handle.feedback_weight("2")))
    B0 = handle.feedback_weight("0")
    a = x.detach() @ W0 + b0
    delta2 = torch.ones(6, 3, dtype=D)
    delta1 = (delta2 @ B2.t()) * (1 - torch.tanh(a) ** 2)  # B in place of W, as [in, out]
    torch.testing.assert_close(model[2].weight.grad, torch.tanh(a).t() @ delta2)
    torch.testing.assert_close(model[0].weight.grad, x.detach().t() @ delta1)
    torch.testing.assert_close(x.grad, delta1 @ B0.t())
    handle.remove()


def test_the_layer_families_do_not_import_timm():
    import subprocess
    import sys

    code = ("import sys, torch, hebbloss\n"
            "assert hebbloss.layers.why_unsupported(torch.nn.Conv2d(1, 1, 1)) is None\n"
            "print('timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
