"""attach(): locality, exact restoration by remove(), selection, overrides and awkward layers
(in-place ops, repeated calls, pruning, timm's Conv2dSame, refused weight transforms). Miconi 2021.

Every gradient is compared in float64 with tests/reference.py, fed the input and output each layer
actually saw (captured by this file's own forward hooks).
"""
import copy
import weakref

import pytest
import timm.layers
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import hebbloss
from reference import D, channel_dim_of, decay_coefficients, layer_update, rule_update, tf_same_pad, unit_norms_sq

TOL = dict(rtol=1e-10, atol=1e-10)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)  # in place, right after a plastic layer
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, groups=2, padding_mode="reflect", padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = self.up(torch.tanh(self.bn(self.conv2(x))))
        return self.fc(self.pool(x).flatten(1))


def _net():
    return Net().to(D)


def _x():
    return torch.randn(2, 2, 6, 6, dtype=D)


class Capture:
    """This test's own forward hooks: (input, output) clones of every call of the named layers."""

    def __init__(self, model, names):
        self.seen = {n: [] for n in names}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, output):
            self.seen[name].append((args[0].detach().clone(), output.detach().clone()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _expected(layer, calls, rule, post):
    """Sum over the layer's calls of the reference update, as [dW, db]."""
    total = None
    for x, z in calls:
        y = z if post is None else post(z)
        upd = [u for u in rule_update(layer, x, y, z, rule) if u is not None]
        total = upd if total is None else [t + u for t, u in zip(total, upd)]
    return total


def _assert_grad_is_update(layer, update):
    params = hebbloss.layers.plastic_parameters(layer)
    assert len(params) == len(update)
    for p, u in zip(params, update):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, -u, **TOL)


_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks",
)


def _hooks(model):
    return {(n, d): list(getattr(m, d, {}).keys()) for n, m in model.named_modules() for d in _HOOK_DICTS}


# --------------------------------------------------------------------------- exactness in a model


@pytest.mark.parametrize("rule", ["hebb", "instar", "oja", "softhebb"])
def test_every_layer_gets_its_own_rule_update_and_inplace_relu_does_not_spoil_it(rule):
    model = _net()
    names = ["conv1", "conv2", "up", "fc"]
    post = lambda z: torch.relu(z) + 0.1 * z  # noqa: E731
    plastic = hebbloss.attach(model, rule=rule, post=post)
    cap = Capture(model, names)
    model(_x())
    for n in names:  # y is kept exactly where it is not larger than the weight (hebbloss/_local.py)
        record, weight = plastic.records[n][0], getattr(model, n).weight
        if cap.seen[n][0][1].numel() > weight.numel():
            assert record.post is None
        else:
            torch.testing.assert_close(record.post, post(cap.seen[n][0][1]), rtol=0, atol=0)
    plastic.loss().backward()
    for n in names:
        layer = getattr(model, n)
        _assert_grad_is_update(layer, _expected(layer, cap.seen[n], rule, post))
    plastic.remove()
    cap.remove()


def _top_k(z, k, axis):
    """z where it is among the k largest along ``axis`` (by rank), else 0."""
    rank = z.argsort(dim=axis, descending=True).argsort(dim=axis)
    return torch.where(rank < k, z, torch.zeros_like(z))


def _soft_wta(z, beta, axis):
    """softmax(beta z) along ``axis``, negated off the winner (Journe et al. 2023)."""
    e = torch.exp(beta * (z - z.amax(dim=axis, keepdim=True)))
    y = e / e.sum(dim=axis, keepdim=True)
    return torch.where(z == z.amax(dim=axis, keepdim=True), y, -y)


@pytest.mark.parametrize("name, signal", [
    ("relu", lambda z, axis: torch.clamp(z, min=0)),
    ("None", lambda z, axis: z),
    ("kwta:2", lambda z, axis: _top_k(z, 2, axis)),
    ("kwta", lambda z, axis: _top_k(z, 1, axis)),
    ("softwta:0.5", lambda z, axis: _soft_wta(z, 0.5, axis)),
    ("triangle:2", lambda z, axis: torch.clamp(z - z.mean(dim=axis, keepdim=True), min=0) ** 2),
])
def test_a_post_given_by_its_command_line_name_acts_along_each_layers_channels(name, signal):
    """post="relu" used to be accepted and fail at the first forward ('str' object is not callable)."""
    model = _net()
    names = ["conv1", "conv2", "up", "fc"]
    plastic = hebbloss.attach(model, rule="oja", post=name)
    cap = Capture(model, names)
    model(_x())
    plastic.loss().backward()
    for n in names:
        layer = getattr(model, n)
        post = lambda z: signal(z, channel_dim_of(layer))  # noqa: E731
        _assert_grad_is_update(layer, _expected(layer, cap.seen[n], "oja", post))
    plastic.remove()
    cap.remove()


@pytest.mark.parametrize("model", [
    # y larger than the weight: its update is taken in the hook, before the in-place op runs
    nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Conv2d(3, 2, 1), nn.SiLU(inplace=True)),
    # y smaller than the weight: y waits for the backward, so hebbloss must keep a copy of it
    nn.Sequential(nn.Flatten(), nn.Linear(72, 8), nn.ReLU(inplace=True), nn.Linear(8, 9), nn.SiLU(inplace=True)),
], ids=["conv", "linear"])
def test_inplace_op_after_a_layer_with_identity_post(model):
    """post=None makes y alias z; an in-place op right after the layer must not change the update."""
    model = model.to(D)
    names = [n for n, m in model.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))]
    plastic = hebbloss.attach(model, rule="oja")
    cap = Capture(model, names)
    model(_x())
    for n in names:
        if plastic.records[n][0].post is not None:
            torch.testing.assert_close(plastic.records[n][0].post, cap.seen[n][0][1], rtol=0, atol=0)
    assert any(plastic.records[n][0].post is not None for n in names) == isinstance(model[1], nn.Linear)
    plastic.loss().backward()
    for n in names:
        _assert_grad_is_update(getattr(model, n), _expected(getattr(model, n), cap.seen[n], "oja", None))


def test_post_that_modifies_the_output_in_place_is_refused():
    model = nn.Sequential(nn.Linear(3, 2)).to(D)
    plastic = hebbloss.attach(model, rule="oja", post=nn.ReLU(inplace=True))
    with pytest.raises(ValueError, match=r"layer '0' modified the layer's output in place.*nn.ReLU\(\)"):
        model(torch.randn(4, 3, dtype=D))
    assert plastic.records["0"] == []


def test_a_layer_called_twice_sums_both_records():
    lin = nn.Linear(3, 3).to(D)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    plastic = hebbloss.attach(model, rule="instar", post=torch.tanh)
    cap = Capture(model, ["0"])
    model(torch.randn(5, 3, dtype=D))
    assert len(plastic.records["0"]) == 2 and len(cap.seen["0"]) == 2
    plastic.loss().backward()
    _assert_grad_is_update(lin, _expected(lin, cap.seen["0"], "instar", torch.tanh))


def test_pruned_layer_gets_mask_times_update_on_weight_orig():
    conv = nn.Conv2d(2, 4, 3).to(D)
    prune.random_unstructured(conv, "weight", amount=0.5)
    mask = conv.weight_mask.clone()
    assert 0 < mask.sum() < mask.numel()
    model = nn.Sequential(conv)
    plastic = hebbloss.attach(model, rule="oja", post=torch.tanh)
    assert plastic.plastic_parameters() == [conv.weight_orig, conv.bias]
    cap = Capture(model, ["0"])
    model(_x())
    plastic.loss().backward()
    dW, db = _expected(conv, cap.seen["0"], "oja", torch.tanh)  # conv.weight = weight_orig * mask
    torch.testing.assert_close(conv.weight_orig.grad, -mask * dW, **TOL)
    torch.testing.assert_close(conv.bias.grad, -db, **TOL)


@pytest.mark.parametrize("size, stride, dilation", [((7, 8), 2, 1), ((5, 6), 3, 1), ((6, 5), 1, 2)])
def test_timm_conv2d_same_pads_dynamically_and_is_exact(size, stride, dilation):
    conv = timm.layers.Conv2dSame(3, 4, 3, stride=stride, dilation=dilation).to(D)
    plastic = hebbloss.attach(conv, rule="softhebb", post=torch.tanh)
    x = torch.randn(2, 3, *size, dtype=D)
    z = conv(x)
    plastic.loss().backward()
    padded = tf_same_pad(x, 3, stride, dilation)  # TensorFlow "SAME", then a padding-0 conv
    y = torch.tanh(z.detach())
    dW, db = layer_update(conv, padded, y, decay_coefficients("softhebb", y, z.detach(), 1))
    torch.testing.assert_close(conv.weight.grad, -dW, **TOL)
    torch.testing.assert_close(conv.bias.grad, -db, **TOL)


def test_plain_subclass_is_treated_as_its_parent():
    class MyLinear(nn.Linear):
        pass

    layer = MyLinear(3, 2).to(D)
    plastic = hebbloss.attach(layer, rule="oja")
    x = torch.randn(4, 3, dtype=D)
    z = layer(x)
    plastic.loss().backward()
    _assert_grad_is_update(layer, _expected(layer, [(x, z.detach())], "oja", None))


def test_cpu_autocast_bfloat16_is_the_rule_update_within_bfloat16_precision():
    """Under autocast the layer computes in bfloat16; the float32 grads match the reference to ~bf16 eps."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 16, 3))
    plastic = hebbloss.attach(model, rule="oja", post=torch.tanh)
    cap = Capture(model, ["0", "2"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 6, 6))
        loss = plastic.loss()
    loss.backward()
    for n in ("0", "2"):
        layer = model[int(n)]
        assert cap.seen[n][0][1].dtype == torch.bfloat16
        for p, u in zip(hebbloss.layers.plastic_parameters(layer), _expected(layer, cap.seen[n], "oja", torch.tanh)):
            assert p.grad.dtype == torch.float32
            torch.testing.assert_close(p.grad.double(), -u, rtol=0, atol=2e-2 * u.abs().max().item())


@pytest.mark.parametrize("rule", ["hebb", "oja"])
def test_loss_value_under_bfloat16_autocast_is_float32(rule):
    """The layers compute in bfloat16; the loss is summed in float32 whether or not a rule has decay."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 16, 3))
    plastic = hebbloss.attach(model, rule=rule, post=torch.tanh)
    cap = Capture(model, ["0", "2"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 6, 6))
        loss = plastic.loss()
    assert loss.dtype == torch.float32
    expected = torch.zeros((), dtype=D)
    for n in ("0", "2"):
        layer = model[int(n)]
        z = cap.seen[n][0][1].to(D)
        y = torch.tanh(cap.seen[n][0][1]).to(D)  # y as the layer's bfloat16 post signal
        S = decay_coefficients(rule, y, z, channel_dim_of(layer) % z.dim())
        expected += -(y * z).sum() + 0.5 * (S * unit_norms_sq(layer)).sum()
    torch.testing.assert_close(loss.double(), expected, rtol=2e-2, atol=2e-2)
    cap.remove()


# --------------------------------------------------------------------------- locality


def test_surrogate_and_task_gradients_do_not_reach_earlier_layers():
    model = _net()
    plastic = hebbloss.attach(model, rule="oja", targets="conv2")
    model(_x())
    plastic.loss().backward()
    assert model.conv1.weight.grad is None and model.conv1.bias.grad is None
    assert model.conv2.weight.grad is not None
    model.zero_grad(set_to_none=True)
    model(_x()).sum().backward()  # detach_input=True: even a task loss stops at the plastic layer
    assert model.conv1.weight.grad is None
    assert model.fc.weight.grad is not None
    plastic.remove()


def test_surrogate_plus_task_loss_in_one_backward_and_retained_graph():
    """attach's node runs the layer's backward itself: a task loss that also reaches the plastic
    layer through its output must add to the rule's update, and a retained graph must give it twice."""
    model, x = _net(), _x()
    plain = copy.deepcopy(model)
    plain(x).sum().backward()  # the task gradient of conv2 by plain backprop
    task_w, task_b = plain.conv2.weight.grad, plain.conv2.bias.grad
    plastic = hebbloss.attach(model, rule="oja", post=torch.relu, targets="conv2")
    cap = Capture(model, ["conv2"])
    out = model(x)
    (plastic.loss() + out.sum()).backward()
    update_w, update_b = _expected(model.conv2, cap.seen["conv2"], "oja", torch.relu)
    torch.testing.assert_close(model.conv2.weight.grad, task_w - update_w, **TOL)
    torch.testing.assert_close(model.conv2.bias.grad, task_b - update_b, **TOL)
    model.zero_grad(set_to_none=True)
    cap.seen["conv2"].clear()
    model(_x())
    loss = plastic.loss()
    loss.backward(retain_graph=True)
    loss.backward()
    update_w, update_b = _expected(model.conv2, cap.seen["conv2"], "oja", torch.relu)
    torch.testing.assert_close(model.conv2.weight.grad, -2 * update_w, **TOL)
    torch.testing.assert_close(model.conv2.bias.grad, -2 * update_b, **TOL)
    cap.remove()
    plastic.remove()


def test_detach_input_false_keeps_the_model_graph_but_the_surrogate_stays_local():
    model = _net()
    plastic = hebbloss.attach(model, rule="instar", post=torch.tanh, targets=["conv2", "fc"], detach_input=False)
    cap = Capture(model, ["conv2", "fc"])
    out = model(_x())
    plastic.loss().backward()
    assert model.conv1.weight.grad is None and model.bn.weight.grad is None and model.up.weight.grad is None
    for n in ("conv2", "fc"):
        layer = getattr(model, n)
        _assert_grad_is_update(layer, _expected(layer, cap.seen[n], "instar", torch.tanh))
    model.zero_grad(set_to_none=True)
    out.sum().backward()  # the task loss still reaches the first layer
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- one node for every recorded term
# plastic.loss() is one autograd node. A layer whose y is larger than its weight has its Hebbian half
# sum y x computed in the forward hook and y let go; the others keep y and have theirs computed in the
# node's backward, by one engine call for all of them. Either way the smaller of y and the gradient is
# multiplied by the upstream gradient (hebbloss/_local.py).


class Wide(nn.Module):
    """conv: y (2x4x9x9 = 648) larger than its weight (4x2x3x3 = 72): computed in the forward hook;
    fc: y (2x3 = 6) smaller than its weight (3x4 = 12): y waits for the backward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("upstream", [1.0, -2.5])
def test_both_scalings_give_the_update_times_the_upstream_gradient(reduction, upstream):
    model = Wide().to(D)
    plastic = hebbloss.attach(model, rule="oja", post=torch.tanh, reduction=reduction)
    cap = Capture(model, ["conv", "fc"])
    model(torch.randn(2, 2, 9, 9, dtype=D))
    assert plastic.records["conv"][0].post is None and plastic.records["fc"][0].post is not None
    (upstream * plastic.loss()).backward()
    for n, per in (("conv", 2 * 9 * 9), ("fc", 2)):
        layer = getattr(model, n)
        n_pairs = per if reduction == "mean" else 1
        for p, u in zip(hebbloss.layers.plastic_parameters(layer), _expected(layer, cap.seen[n], "oja", torch.tanh)):
            torch.testing.assert_close(p.grad, -upstream * u / n_pairs, **TOL)
    cap.remove()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_value_of_layers_with_and_without_decay_is_the_sum_of_their_surrogates(reduction):
    """hebb (S = 0) on conv1 and fc, Oja on conv2 and up: L = sum over layers of
    (-sum(y*z) + 1/2 sum_c S_c (||W_c||^2 + b_c^2)) / (1 or N)."""
    model = _net()
    post = torch.tanh
    plastic = hebbloss.attach(model, rule="hebb", post=post, overrides={"conv2": {"rule": "oja"}, "up": {"rule": "oja"}},
                              reduction=reduction)
    names = {"conv1": "hebb", "conv2": "oja", "up": "oja", "fc": "hebb"}
    cap = Capture(model, list(names))
    model(_x())
    expected = torch.zeros((), dtype=D)
    for n, rule in names.items():
        layer = getattr(model, n)
        z = cap.seen[n][0][1]
        y = post(z)
        cdim = channel_dim_of(layer) % z.dim()
        term = -(y * z).sum() + 0.5 * (decay_coefficients(rule, y, z, cdim) * unit_norms_sq(layer)).sum()
        expected += term / (z.numel() // z.shape[cdim] if reduction == "mean" else 1)
    torch.testing.assert_close(plastic.loss().detach(), expected, **TOL)
    cap.remove()


def test_backward_leaves_a_kept_post_signal_unchanged():
    model = Wide().to(D)
    plastic = hebbloss.attach(model, rule="instar", post=torch.tanh)
    model(torch.randn(2, 2, 9, 9, dtype=D))
    record = plastic.records["fc"][0]
    before = record.post.clone()
    plastic.loss().backward()
    assert torch.equal(record.post, before)


def test_a_post_signal_larger_than_the_weight_is_let_go_in_the_forward():
    """Where y is larger than the weight, nothing of hebbloss holds it after the layer's hook."""
    kept = {}

    def post(z):
        y = torch.tanh(z)
        kept[z.shape[-1]] = weakref.ref(y)
        return y

    model = Wide().to(D)
    plastic = hebbloss.attach(model, rule="oja", post=post)
    model(torch.randn(2, 2, 9, 9, dtype=D))
    assert kept[9]() is None        # conv: its update is already taken
    assert kept[3]() is not None    # fc: y waits for the backward
    plastic.loss().backward()



@pytest.mark.parametrize("detach_input", [True, False])
def test_a_large_post_signals_update_is_taken_in_batch_chunks_without_the_layers_backward(monkeypatch, detach_input):
    """Default mode: where y is larger than the weight, sum y x comes from the layer family's weight-gradient
    product over batch chunks (here one sample each): the layer's own backward node never runs, and the
    update is the float64 reference's."""
    import hebbloss._local

    monkeypatch.setattr(hebbloss._local, "CHUNK_BYTES", 1)
    conv, x = nn.Conv2d(2, 3, 3, padding=1).to(D), torch.randn(4, 2, 9, 9, dtype=D, requires_grad=not detach_input)
    ran = []
    plastic = hebbloss.attach(conv, rule="oja", post=torch.relu, detach_input=detach_input)

    def watch(module, args, out):  # before attach's hook: sees the node a call of the layer's backward would run
        out.grad_fn.register_prehook(lambda grads: ran.append(grads))

    conv.register_forward_hook(watch, prepend=True)
    z = conv(x)
    assert plastic.records[""][0].post is None  # taken in the forward
    plastic.loss().backward()
    assert ran == []
    update = rule_update(conv, x.detach(), torch.relu(z.detach()), z.detach(), "oja")
    torch.testing.assert_close(conv.weight.grad, -update[0], **TOL)
    torch.testing.assert_close(conv.bias.grad, -update[1], **TOL)

def test_a_task_loss_and_a_retained_graph_through_a_layer_whose_update_was_taken_in_the_forward():
    """The hook's own call of the layer's backward keeps its graph: a task loss through the same output
    still reaches the weight, and a retained graph gives the update twice."""
    model, x = Wide().to(D), torch.randn(2, 2, 9, 9, dtype=D)
    plain = copy.deepcopy(model)
    plain(x).sum().backward()
    plastic = hebbloss.attach(model, rule="oja", post=torch.relu, targets="conv")
    cap = Capture(model, ["conv"])
    out = model(x)
    assert plastic.records["conv"][0].post is None
    (plastic.loss() + out.sum()).backward()
    update = _expected(model.conv, cap.seen["conv"], "oja", torch.relu)
    torch.testing.assert_close(model.conv.weight.grad, plain.conv.weight.grad - update[0], **TOL)
    torch.testing.assert_close(model.conv.bias.grad, plain.conv.bias.grad - update[1], **TOL)
    torch.testing.assert_close(model.fc.weight.grad, plain.fc.weight.grad, **TOL)
    model.zero_grad(set_to_none=True)
    cap.seen["conv"].clear()
    model(x)
    loss = plastic.loss()
    loss.backward(retain_graph=True)
    loss.backward()
    update = _expected(model.conv, cap.seen["conv"], "oja", torch.relu)
    torch.testing.assert_close(model.conv.weight.grad, -2 * update[0], **TOL)
    torch.testing.assert_close(model.conv.bias.grad, -2 * update[1], **TOL)
    cap.remove()


def test_a_layer_called_on_a_large_and_a_small_input_adds_both_kinds_of_term():
    """One weight, two calls: the first y (2x3x8x8) is larger than the weight (3x3x3x3), the second
    (1x3x2x2) smaller; the gradient is the sum of both updates."""
    conv = nn.Conv2d(3, 3, 3, padding=1).to(D)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, big, small):
            return self.conv(big).sum() + self.conv(small).sum()

    model = Twice()
    plastic = hebbloss.attach(model, rule="softhebb", post=torch.tanh)
    cap = Capture(model, ["conv"])
    model(torch.randn(2, 3, 8, 8, dtype=D), torch.randn(1, 3, 2, 2, dtype=D))
    assert [r.post is None for r in plastic.records["conv"]] == [True, False]
    (3.0 * plastic.loss()).backward()
    for p, u in zip(hebbloss.layers.plastic_parameters(conv), _expected(conv, cap.seen["conv"], "softhebb", torch.tanh)):
        torch.testing.assert_close(p.grad, -3.0 * u, **TOL)
    cap.remove()


def test_torch_autograd_grad_of_the_loss_is_the_update():
    """The decay is added inside the node, so autograd.grad (which never touches .grad) gets it too."""
    model = Wide().to(D)
    plastic = hebbloss.attach(model, rule="softhebb", post=torch.tanh)
    cap = Capture(model, ["conv", "fc"])
    model(torch.randn(2, 2, 9, 9, dtype=D))
    params = plastic.plastic_parameters()
    found = torch.autograd.grad(plastic.loss(), params)
    assert all(p.grad is None for p in params)
    expected = [u for n in ("conv", "fc") for u in _expected(getattr(model, n), cap.seen[n], "softhebb", torch.tanh)]
    for g, u in zip(found, expected):
        torch.testing.assert_close(g, -u, **TOL)
    cap.remove()


def test_frozen_weights_and_biases_get_no_gradient_and_the_others_theirs():
    model = Wide().to(D)
    model.conv.weight.requires_grad_(False)   # the conv's bias still learns
    model.fc.requires_grad_(False)            # nothing of fc learns
    plastic = hebbloss.attach(model, rule="oja", post=torch.tanh)
    cap = Capture(model, ["conv"])
    model(torch.randn(2, 2, 9, 9, dtype=D))
    plastic.loss().backward()
    assert model.conv.weight.grad is None and model.fc.weight.grad is None and model.fc.bias.grad is None
    torch.testing.assert_close(model.conv.bias.grad, -_expected(model.conv, cap.seen["conv"], "oja", torch.tanh)[1], **TOL)
    cap.remove()


def test_a_layer_frozen_between_its_forward_and_loss_gets_no_gradient():
    """fc kept y for the backward but no longer learns when loss() is taken; conv still gets its update."""
    model = Wide().to(D)
    plastic = hebbloss.attach(model, rule="oja", post=torch.tanh)
    cap = Capture(model, ["conv"])
    model(torch.randn(2, 2, 9, 9, dtype=D))
    model.fc.requires_grad_(False)
    plastic.loss().backward()
    assert model.fc.weight.grad is None and model.fc.bias.grad is None
    _assert_grad_is_update(model.conv, _expected(model.conv, cap.seen["conv"], "oja", torch.tanh))
    cap.remove()


def test_pruned_layer_called_twice_shares_its_bias_between_two_weights():
    """torch.nn.utils.prune recomputes weight = weight_orig * mask on every call: two weight tensors, one
    bias, both of whose terms must add up on the bias and on weight_orig."""
    conv = nn.Conv2d(3, 3, 3, padding=1).to(D)
    prune.random_unstructured(conv, "weight", amount=0.4)
    model = nn.Sequential(conv, nn.Tanh(), conv)
    plastic = hebbloss.attach(model, rule="instar", post=torch.relu)
    cap = Capture(model, ["0"])
    model(torch.randn(2, 3, 6, 6, dtype=D))
    assert len(plastic.records["0"]) == 2
    assert plastic.records["0"][0].term.weight is not plastic.records["0"][1].term.weight
    plastic.loss().backward()
    dW, db = _expected(conv, cap.seen["0"], "instar", torch.relu)
    torch.testing.assert_close(conv.weight_orig.grad, -conv.weight_mask * dW, **TOL)
    torch.testing.assert_close(conv.bias.grad, -db, **TOL)
    cap.remove()


def test_a_weight_changed_in_place_before_backward_raises():
    model = Wide().to(D)
    plastic = hebbloss.attach(model, rule="oja")
    model(torch.randn(2, 2, 9, 9, dtype=D))
    loss = plastic.loss()
    with torch.no_grad():
        model.fc.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --------------------------------------------------------------------------- remove / context manager


def test_remove_restores_outputs_hooks_and_state_dict_exactly():
    model = _net().eval()
    x = _x()
    before_out = model(x)
    before_hooks, before_keys = _hooks(model), list(model.state_dict())
    plastic = hebbloss.attach(model, rule="softhebb", post=torch.tanh)
    assert list(model.state_dict()) == before_keys
    assert torch.equal(model(x), before_out)  # attaching changes no output bit
    plastic.remove()
    assert _hooks(model) == before_hooks
    assert all(not getattr(m, d, {}) for m in model.modules() for d in _HOOK_DICTS)
    assert list(model.state_dict()) == before_keys
    assert torch.equal(model(x), before_out)
    assert all(not recs for recs in plastic.records.values())
    plastic.remove()  # twice is fine


def test_remove_leaves_the_users_own_hooks():
    model = _net()
    prune.l1_unstructured(model.conv1, "weight", amount=0.3)  # prune's own forward pre-hook
    mine = model.fc.register_forward_hook(lambda *a: None)
    before = _hooks(model)
    with hebbloss.attach(model, rule="oja"):
        model(_x())
    assert _hooks(model) == before
    mine.remove()


def test_context_manager_removes_every_hook():
    model = _net()
    with hebbloss.attach(model, rule="oja") as plastic:
        assert isinstance(plastic, hebbloss.Plasticity)
        model(_x())
        plastic.loss().backward()
    assert all(not getattr(m, d, {}) for m in model.modules() for d in _HOOK_DICTS)
    hebbloss.attach(model).remove()  # the layers are free again


# --------------------------------------------------------------------------- selection and overrides


@pytest.mark.parametrize(
    "targets, chosen",
    [
        (None, ["conv1", "conv2", "up", "fc"]),
        ("conv2", ["conv2"]),
        ("conv?", ["conv1", "conv2"]),
        (r"(conv1|fc)", ["conv1", "fc"]),
        (nn.Conv2d, ["conv1", "conv2"]),
        (nn.ConvTranspose2d, ["up"]),
        (lambda name, m: isinstance(m, nn.Linear) or name == "up", ["up", "fc"]),
        (["fc", nn.ConvTranspose2d], ["up", "fc"]),
    ],
)
def test_selection_by_name_glob_regex_type_predicate(targets, chosen):
    model = _net()
    with hebbloss.attach(model, targets=targets) as plastic:
        assert list(plastic.layers) == chosen
        model(_x())
        assert [n for n, r in plastic.records.items() if r] == chosen


def test_selection_by_suffix_in_a_nested_model():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1))
    with hebbloss.attach(model, targets="0.1") as plastic:
        assert list(plastic.layers) == ["0.1"]
    with hebbloss.attach(model, targets=r"0\.\d") as plastic:
        assert list(plastic.layers) == ["0.0", "0.1"]


def test_overrides_set_rule_and_post_per_layer():
    model = _net()
    overrides = {"conv*": {"rule": "instar"}, "conv2": {"post": torch.tanh}, "fc": {"rule": "softhebb", "post": torch.sigmoid}}
    plastic = hebbloss.attach(model, rule="oja", post=torch.relu, overrides=overrides)
    want = {"conv1": ("instar", torch.relu), "conv2": ("instar", torch.tanh), "up": ("oja", torch.relu), "fc": ("softhebb", torch.sigmoid)}
    assert {n: r.name for n, r in plastic.rules.items()} == {n: r for n, (r, _) in want.items()}
    cap = Capture(model, list(want))
    model(_x())
    plastic.loss().backward()
    for n, (rule, post) in want.items():
        layer = getattr(model, n)
        _assert_grad_is_update(layer, _expected(layer, cap.seen[n], rule, post))


# --------------------------------------------------------------------------- stateful posts


class Threshold(nn.Module):
    """A stateful post: y = relu(z - theta_c), theta a buffer of one value per unit set by bind()."""

    def __init__(self):
        super().__init__()
        self.register_buffer("theta", torch.zeros(0, dtype=D))
        self.modes = []

    def bind(self, num_units):
        self.theta = torch.linspace(0.0, 0.5, num_units, dtype=D)

    def forward(self, z):
        self.modes.append(self.training)
        shape = [1] * z.dim()
        shape[-1 if z.dim() == 2 else 1] = -1
        return torch.relu(z - self.theta.view(shape))


def test_stateful_post_is_copied_bound_trained_with_the_layer_and_saved_in_the_handle():
    model = _net()
    proto = Threshold()
    keys = list(model.state_dict())
    plastic = hebbloss.attach(model, rule="oja", post=proto, targets=["conv2", "up", "fc"])
    assert proto.theta.numel() == 0  # the user's module is untouched
    assert plastic.posts["conv2"].theta.numel() == 4 and plastic.posts["up"].theta.numel() == 2
    assert plastic.posts["fc"].theta.numel() == 3
    assert sorted(plastic.state_dict()) == ["posts.conv2.theta", "posts.fc.theta", "posts.up.theta"]
    assert list(model.state_dict()) == keys
    model.eval()
    cap = Capture(model, ["conv2", "up", "fc"])
    model(_x())
    assert plastic.posts["fc"].modes == [False]
    plastic.loss().backward()
    for n in ("conv2", "up", "fc"):
        layer = getattr(model, n)
        _assert_grad_is_update(layer, _expected(layer, cap.seen[n], "oja", plastic.posts[n]))


def test_post_keys_of_nested_layers_use_slashes():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    with hebbloss.attach(model, post=Threshold()) as plastic:
        assert list(plastic.state_dict()) == ["posts.0/0.theta"]


# --------------------------------------------------------------------------- refused layers


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(0, 1)


def _std_conv():
    return timm.layers.StdConv2d(3, 4, 3)


def _scaled_std_conv():
    return timm.layers.ScaledStdConv2d(3, 4, 3)


def _weight_norm():
    return nn.utils.parametrizations.weight_norm(nn.Linear(3, 3))


def _old_weight_norm():
    with pytest.warns(FutureWarning):
        return nn.utils.weight_norm(nn.Linear(3, 3))


def _parametrized():
    layer = nn.Linear(3, 3)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    return layer


def _forward_override():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return super().forward(2 * x)

    return Scaled(3, 4, 3)


@pytest.mark.parametrize(
    "make, reason",
    [
        (_std_conv, r"StdConv2d overrides forward\(\) of Conv2d"),
        (_scaled_std_conv, r"ScaledStdConv2d overrides forward\(\) of Conv2d"),
        (_weight_norm, r"parametrized weight \(e\.g\. weight norm\)"),
        (_old_weight_norm, r"weight_norm"),
        (_parametrized, r"parametrized weight"),
        (_forward_override, r"Scaled overrides forward\(\) of Conv2d"),
    ],
)
@pytest.mark.parametrize("explicit", [False, True])
def test_layers_with_a_transformed_weight_are_refused_clearly(make, reason, explicit):
    model = nn.Sequential(nn.Identity(), make())
    before = _hooks(model)
    with pytest.raises(ValueError, match=r"cannot be made plastic:\n  - 1: [^\n]*" + reason) as err:
        hebbloss.attach(model, targets="1" if explicit else None)
    assert "targets=" in str(err.value)  # says what to do
    assert _hooks(model) == before
    with hebbloss.attach(nn.Sequential(nn.Linear(2, 2))):  # nothing half-attached is left behind
        pass
