"""attach(..., streaming=True): each layer's update is taken in its forward hook and its output, post
signal and graph are let go; the gradients are still the rule's update (Miconi 2021), checked in
float64 against tests/reference.py on every layer kind, with the weight-gradient product taken over
the whole batch and one sample at a time; the records keep no activation, and the model's forward
records no graph between the plastic layers."""
import weakref

import pytest
import timm.layers
import torch
from torch import nn
from torch.nn.utils import prune

import hebbloss
import hebbloss._local
import reference
from reference import D, rule_update, tf_same_pad

TOL = dict(rtol=1e-10, atol=1e-10)


def _pruned():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    prune.random_unstructured(conv, "weight", amount=0.5)
    return conv


LAYERS = {  # name: (make the layer, input shape)
    "linear_leading_dims": (lambda: nn.Linear(5, 4), (2, 3, 5)),
    "linear_no_bias": (lambda: nn.Linear(5, 4, bias=False), (3, 5)),
    "conv1d_strided": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 9)),
    "conv2d_grouped_dilated": (lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2), (2, 4, 7, 7)),
    "conv2d_reflect_strided": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), (2, 3, 8, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (2, 2, 4, 5, 3)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, output_padding=1), (2, 3, 5)),
    "conv_transpose2d_grouped": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2, dilation=2), (2, 4, 4, 5)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(2, 3, 2, stride=2), (1, 2, 3, 2, 3)),
    "pruned_conv2d": (_pruned, (2, 3, 5, 5)),
    "timm_conv2d_same": (lambda: timm.layers.Conv2dSame(3, 4, 3, stride=2), (2, 3, 7, 8)),
}


def _seen_input(layer, x):
    """The input the weight met (timm's Conv2dSame pads inside forward, as TensorFlow "SAME")."""
    if isinstance(layer, timm.layers.Conv2dSame):
        return tf_same_pad(x, layer.kernel_size, layer.stride, layer.dilation)
    return x


def _grads_of_reference(layer, x, z, post, rule, reduction):
    """The expected .grad of each plastic parameter: minus the float64 reference update."""
    y = z if post is None else post(z)
    dW, db = rule_update(layer, _seen_input(layer, x), y, z, rule)
    n = z.numel() // z.shape[-1 if isinstance(layer, nn.Linear) else 1] if reduction == "mean" else 1
    weight = (-dW / n) if not hasattr(layer, "weight_mask") else (-dW / n) * layer.weight_mask
    return [weight] + ([] if db is None else [-db / n])


@pytest.fixture(params=["whole_batch", "one_sample_chunks"])
def chunks(request, monkeypatch):
    """The streamed sum y x over the whole batch at once (these layers are small), or one sample at a time."""
    if request.param == "one_sample_chunks":
        monkeypatch.setattr(hebbloss._local, "CHUNK_BYTES", 1)
    return request.param


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("rule", ["hebb", "oja", "softhebb"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_streaming_gives_the_rule_update_on_every_layer_kind(kind, rule, reduction, chunks):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = make().to(D)
    post = torch.tanh if rule != "hebb" else None
    model = nn.Sequential(layer)
    plastic = hebbloss.attach(model, rule=rule, post=post, reduction=reduction, streaming=True)
    x = torch.randn(*shape, dtype=D)
    out = model(x)
    record = plastic.records["0"][0]
    assert record.output is None and record.local is None and record.post is None  # all let go
    assert not out.requires_grad  # passed on detached: nothing keeps a graph back into the layer
    loss = plastic.loss()
    loss.backward()
    plastic.remove()
    with torch.no_grad():
        z = layer(x)
    for p, expected in zip(hebbloss.layers.plastic_parameters(layer), _grads_of_reference(layer, x, z, post, rule, reduction)):
        torch.testing.assert_close(p.grad, expected, **TOL)
    torch.testing.assert_close(loss, _value_of_reference(layer, z, post, rule, reduction), **TOL)


def _value_of_reference(layer, z, post, rule, reduction):
    """-sum y z + 1/2 sum_c S_c (||W_c||^2 + b_c^2), divided by the (sample, position) pairs for "mean"."""
    y = z if post is None else post(z)
    channel = -1 if isinstance(layer, nn.Linear) else 1
    S = reference.decay_coefficients(rule, y, z, channel)
    n = z.numel() // z.shape[channel] if reduction == "mean" else 1
    return (-(y.to(D) * z.to(D)).sum() + 0.5 * (S * reference.unit_norms_sq(layer)).sum()) / n


@pytest.mark.parametrize("streaming", [False, True])
def test_a_softhebb_subclass_with_its_own_decay_is_not_read_off_the_weight_gradient(streaming):
    """SoftHebb's S_c = sum y z is taken from the weight-gradient product; a subclass that changes the
    density must get its own S_c (here 2 y z), not the parent's."""

    class DoubleSoftHebb(hebbloss.rules.SoftHebb):
        def decay(self, post, output):
            return 2 * post * output

    torch.manual_seed(1)
    layer = nn.Conv2d(2, 3, 3, padding=1).to(D)
    x = torch.randn(2, 2, 6, 6, dtype=D)
    plastic = hebbloss.attach(layer, rule=DoubleSoftHebb(), post=torch.tanh, streaming=streaming)
    z = layer(x)
    loss = plastic.loss()
    loss.backward()
    plastic.remove()
    y, z = torch.tanh(z.detach()), z.detach()
    S = 2 * (y * z).sum(dim=(0, 2, 3))
    dW, db = reference.reference_update("conv", layer.weight.detach(), layer.bias.detach(), x, y, S, padding=1)
    torch.testing.assert_close(layer.weight.grad, -dW, **TOL)
    torch.testing.assert_close(layer.bias.grad, -db, **TOL)
    torch.testing.assert_close(loss, -(y * z).sum() + 0.5 * (S * reference.unit_norms_sq(layer)).sum(), **TOL)


class Net(nn.Module):
    """Plastic layers with an in-place ReLU, a trainable BatchNorm and a transposed conv between them."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, groups=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = self.up(torch.tanh(self.bn(self.conv2(x))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("detach_input", [True, False])
@pytest.mark.parametrize("rule", ["hebb", "oja", "softhebb"])
def test_streaming_and_normal_mode_give_the_same_loss_and_gradients_in_a_model(rule, detach_input, chunks):
    """Each layer's gradient is the reference update of the input and output it saw (this test's own
    hooks), in both modes; the loss values agree."""
    torch.manual_seed(1)
    model = Net().to(D)
    x = torch.randn(2, 2, 6, 6, dtype=D)
    names = ["conv1", "conv2", "up", "fc"]
    result = {}
    for streaming in (False, True):
        seen = {}
        hooks = [getattr(model, n).register_forward_hook(
            lambda m, a, o, n=n: seen.setdefault(n, (a[0].detach().clone(), o.detach().clone())) and None) for n in names]
        plastic = hebbloss.attach(model, rule=rule, post=torch.tanh, detach_input=detach_input, streaming=streaming)
        model.zero_grad(set_to_none=True)
        model(x)
        loss = plastic.loss()
        loss.backward()
        plastic.remove()
        for h in hooks:
            h.remove()
        result[streaming] = loss.item()
        for n in names:
            layer = getattr(model, n)
            inp, z = seen[n]
            dW, db = rule_update(layer, inp, torch.tanh(z), z, rule)
            torch.testing.assert_close(layer.weight.grad, -dW, **TOL)
            torch.testing.assert_close(layer.bias.grad, -db, **TOL)
    assert result[True] == pytest.approx(result[False], rel=1e-12)


def test_streaming_lets_each_layers_output_go_in_the_forward():
    """A layer's output tensor (seen by this test's hook, registered first) is freed by the end of the
    forward in streaming mode. In the normal mode on the CPU too where its update was taken at once
    (y larger than the weight) and is finite; it is kept until loss() where y waits for the backward
    (y smaller than the weight) and where the term is NaN (for loss()'s message)."""
    def output_alive(streaming, x, width=8):
        model = nn.Sequential(nn.Conv2d(2, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2, 3, padding=1))
        refs = []
        model[0].register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o)) and None)
        plastic = hebbloss.attach(model, rule="oja", post="relu", streaming=streaming)
        model(x)
        alive = refs[0]() is not None
        if torch.isfinite(x).all():
            plastic.loss().backward()
        else:
            with pytest.raises(FloatingPointError, match="layer '0' produced NaN or Inf in its output from a finite"):
                plastic.loss()
        plastic.remove()
        return alive

    large, small = torch.randn(2, 2, 16, 16), torch.randn(1, 2, 2, 2)  # y 2x8x16x16 > weight 8x2x3x3 > y 1x8x2x2
    assert not output_alive(True, large) and not output_alive(True, small)
    assert not output_alive(False, large)
    assert output_alive(False, small)
    assert output_alive(False, large.index_fill(3, torch.tensor([4]), float("nan")))


def test_streaming_names_the_layer_whose_output_was_not_finite():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    plastic = hebbloss.attach(model, rule="hebb", streaming=True)
    model(torch.tensor([[1.0, float("nan"), 0.0]]))
    with pytest.raises(FloatingPointError, match="layer '0' produced NaN or Inf in its output"):
        plastic.loss()
    assert all(not r for r in plastic.records.values())


def test_a_layer_called_twice_in_streaming_mode_gets_the_sum_of_both_updates():
    lin = nn.Linear(3, 4).to(D)
    model = nn.Sequential(lin)
    plastic = hebbloss.attach(model, rule="oja", post=torch.tanh, streaming=True)
    x1, x2 = torch.randn(5, 3, dtype=D), torch.randn(2, 3, dtype=D)
    model(x1), model(x2)
    assert len(plastic.records["0"]) == 2
    plastic.loss().backward()
    plastic.remove()
    expected = None
    for x in (x1, x2):
        with torch.no_grad():
            z = lin(x)
        upd = rule_update(lin, x, torch.tanh(z), z, "oja")
        expected = upd if expected is None else [a + b for a, b in zip(expected, upd)]
    torch.testing.assert_close(lin.weight.grad, -expected[0], **TOL)
    torch.testing.assert_close(lin.bias.grad, -expected[1], **TOL)


class _Counting:
    """Wraps a layer family's adjoint and counts its weight-gradient calls."""

    def __init__(self, adjoint):
        self.adjoint, self.calls = adjoint, 0

    def weight_grad(self, delta, x, feedback):
        self.calls += 1
        return self.adjoint.weight_grad(delta, x, feedback)


@pytest.mark.parametrize("make, shape, calls", [
    (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="circular"), (5, 2, 9, 8), 3),  # 2 + 2 + 1 samples
    (lambda: nn.ConvTranspose2d(2, 4, 3, stride=2, groups=2), (5, 2, 4, 3), 3),
    (lambda: nn.Linear(4, 3), (5, 6, 4), 3),  # leading dimensions: chunks of samples of 6 tokens
])
def test_chunked_hebbian_sums_the_rule_update_over_batch_chunks(make, shape, calls):
    torch.manual_seed(2)
    layer = make().to(D)
    x = torch.randn(*shape, dtype=D)
    with torch.no_grad():
        z = layer(x)
    y = torch.tanh(z)
    kind = hebbloss.layers.layer_type_of(layer)
    counting = _Counting(kind.adjoint(layer, x, z))
    per_sample = y[0].numel() * y.element_size()
    got = hebbloss._local.chunked_hebbian(layer.weight, layer.bias, kind, counting, x, y,
                                          [layer.weight, layer.bias], chunk_bytes=2 * per_sample)
    assert counting.calls == calls
    dW, db = rule_update(layer, x, y, z, "hebb")  # Hebb: sum y x and sum y, nothing else
    torch.testing.assert_close(got[id(layer.weight)], dW, **TOL)
    torch.testing.assert_close(got[id(layer.bias)], db, **TOL)


class _Skip(nn.Module):
    """A plastic conv, a trainable BatchNorm whose output is both the next plastic conv's input and a
    skip added to its output (as in a ResNet block), and a non-plastic head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = self.bn(self.conv1(x))
        return self.head(self.conv2(h) + h)


def test_streaming_records_no_graph_between_the_plastic_layers():
    """The model's graph outside the plastic layers would hold their outputs alive (the BatchNorm saves
    its input, conv1's output, and the skip keeps it reachable); streaming records none, so conv1's
    output goes in the forward and the model's output has no graph. BatchNorm's running statistics
    move as in the normal mode, and the grad mode is the caller's again after the forward."""
    torch.manual_seed(3)
    x = torch.randn(3, 2, 6, 6)
    result = {}
    for streaming in (False, True):
        torch.manual_seed(4)
        model = _Skip()
        refs = []
        model.conv1.register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o)) and None)
        plastic = hebbloss.attach(model, rule="oja", post="relu", targets=["conv1", "conv2"], streaming=streaming)
        out = model(x)
        assert torch.is_grad_enabled()
        result[streaming] = (refs[0]() is not None, out.requires_grad, model.bn.running_mean.clone(),
                             model.bn.running_var.clone())
        plastic.loss().backward()
        assert model.bn.weight.grad is None and model.head.weight.grad is None  # only the rules' gradients
        plastic.remove()
    assert result[False][:2] == (True, True)
    assert result[True][:2] == (False, False)
    torch.testing.assert_close(result[True][2], result[False][2], rtol=0, atol=0)
    torch.testing.assert_close(result[True][3], result[False][3], rtol=0, atol=0)


def test_streaming_under_no_grad_records_nothing_and_leaves_grad_off():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    plastic = hebbloss.attach(model, rule="oja", streaming=True)
    with torch.no_grad():
        model(torch.randn(2, 3))
        assert not torch.is_grad_enabled()
    assert all(not r for r in plastic.records.values())
    model(torch.randn(2, 3))
    assert all(len(r) == 1 for r in plastic.records.values())
    plastic.remove()


def test_a_plastic_layer_called_on_its_own_in_streaming_mode_keeps_the_callers_grad_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    plastic = hebbloss.attach(model, rule="hebb", streaming=True)
    out = model[0](torch.randn(2, 3))
    assert torch.is_grad_enabled() and not out.requires_grad and len(plastic.records["0"]) == 1
    plastic.remove()


@pytest.mark.parametrize("streaming", [False, True])
def test_an_unbatched_linear_call_gets_the_rule_update(streaming):
    """A Linear called on one unbatched vector: y is the bias's update itself (a sum over no dimension)."""
    torch.manual_seed(0)
    layer = nn.Linear(1, 6).to(D)  # y (6) no smaller than the weight (6): its update is taken in the forward hook
    plastic = hebbloss.attach(layer, rule="oja", post=torch.tanh, streaming=streaming)
    x = torch.randn(1, dtype=D)
    layer(x)
    plastic.loss().backward()
    plastic.remove()
    with torch.no_grad():
        z = layer(x)
    for p, expected in zip((layer.weight, layer.bias), _grads_of_reference(layer, x, z, torch.tanh, "oja", "sum")):
        torch.testing.assert_close(p.grad, expected, **TOL)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("depthwise", [False, True])
def test_a_channels_last_conv_gives_the_loss_value_and_the_rule_update(streaming, depthwise):
    """Input and output in channels-last layout (as timm's LayerNorm2d leaves them): the value
    -<y, z> + 1/2 sum_c S_c (||W_c||^2 + b_c^2) and the update are those of the plain float64 sums."""
    torch.manual_seed(0)
    layer = (nn.Conv2d(4, 4, 3, padding=1, groups=4) if depthwise else nn.Conv2d(3, 5, 1)).to(D)
    x = torch.randn(2, layer.in_channels, 6, 5, dtype=D).contiguous(memory_format=torch.channels_last)
    plastic = hebbloss.attach(layer, rule="oja", post=torch.relu, streaming=streaming)
    out = layer(x)
    assert not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
    loss = plastic.loss()
    loss.backward()
    plastic.remove()
    with torch.no_grad():
        z = layer(x.contiguous())
    y = torch.relu(z)
    S = (y * y).sum(dim=(0, 2, 3))
    norms = (layer.weight.detach() ** 2).sum(dim=(1, 2, 3)) + layer.bias.detach() ** 2
    expected_value = -(y * z).sum() + 0.5 * (S * norms).sum()
    torch.testing.assert_close(loss.detach(), expected_value, **TOL)
    for p, expected in zip((layer.weight, layer.bias), _grads_of_reference(layer, x, z, torch.relu, "oja", "sum")):
        torch.testing.assert_close(p.grad, expected, **TOL)


@pytest.mark.parametrize("device, calls", [("cpu", 5), ("meta", 1)])
def test_the_weight_gradient_is_taken_in_cache_sized_chunks_on_the_cpu_and_whole_elsewhere(monkeypatch, device, calls):
    """Chunks keep the kernel's workspace in the CPU's cache; a GPU (here the meta device, which has none
    either) gets the whole batch in one call: fewer kernel launches."""
    layer = nn.Conv2d(2, 3, 3, padding=1).to(device)
    x = torch.ones(5, 2, 6, 6, device=device)
    with torch.no_grad():
        z = layer(x)
    kind = hebbloss.layers.layer_type_of(layer)
    counting = _Counting(kind.adjoint(layer, x, z))
    monkeypatch.setattr(hebbloss._local, "CHUNK_BYTES", z[0].numel() * z.element_size())  # one sample
    got = hebbloss._local.chunked_hebbian(layer.weight, layer.bias, kind, counting, x, z, [layer.weight, layer.bias])
    assert counting.calls == calls and got[id(layer.weight)].shape == layer.weight.shape


def test_a_large_weights_product_is_taken_in_one_call_on_the_cpu(monkeypatch):
    """Each chunk writes and adds a weight-sized result: for a weight above CHUNKED_WEIGHT_BYTES that
    costs more than the cache saves, so its batch goes in one call; the sum is the same."""
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3, padding=1).to(D)
    x = torch.randn(5, 2, 6, 6, dtype=D)
    with torch.no_grad():
        z = layer(x)
    kind = hebbloss.layers.layer_type_of(layer)
    monkeypatch.setattr(hebbloss._local, "CHUNK_BYTES", z[0].numel() * z.element_size())  # one sample
    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    for limit, calls in ((weight_bytes, 5), (weight_bytes - 1, 1)):
        monkeypatch.setattr(hebbloss._local, "CHUNKED_WEIGHT_BYTES", limit)
        counting = _Counting(kind.adjoint(layer, x, z))
        got = hebbloss._local.chunked_hebbian(layer.weight, None, kind, counting, x, z, [layer.weight])
        assert counting.calls == calls
        dW, _ = rule_update(layer, x, z, z, "hebb")
        torch.testing.assert_close(got[id(layer.weight)], dW, **TOL)
