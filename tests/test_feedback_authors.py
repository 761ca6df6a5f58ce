"""The feedback modes as their authors run them, against plain float64 references written here:
uSF's fixed scale (Moskovitz et al. 2018 / BioTorch), the weight-norm constraint, Batch Manhattan
(Liao et al. 2016), and weight decay on W and B for urfb (Amit 2019) and kp (Akrout et al. 2019)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hebbloss import feedback as fb
from hebbloss import models

pytestmark = pytest.mark.usefixtures("float64_default")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _std(t):
    t = t.detach().double().flatten()
    n = t.numel()
    mean = sum(float(v) for v in t) / n
    return math.sqrt(sum((float(v) - mean) ** 2 for v in t) / (n - 1))


def _sgd_steps(model, steps, opt, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# --- uSF: B = s * sign(W), s fixed at conversion ---------------------------------------------------

def test_usf_scale_is_fixed_at_conversion_and_b_follows_the_sign_of_w():
    model = _mlp()
    scales = [_std(model[0].weight), _std(model[2].weight)]  # s: the std of W when convert() runs
    handle = fb.convert(model, "usf")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _sgd_steps(model, 5, opt)
    for name, s in zip(("0", "2"), scales):
        w = model[int(name)].weight.detach()
        assert _std(w) != pytest.approx(s, rel=1e-3), "the steps must have changed W's spread"
        expected = torch.tensor([[s * (1.0 if v > 0 else -1.0 if v < 0 else 0.0) for v in row] for row in w.tolist()])
        torch.testing.assert_close(handle.feedback_weight(name), expected, rtol=1e-12, atol=0)
    # the input gradient of the last layer is delta @ B with that B
    x = torch.randn(4, 5, requires_grad=True)
    h = model[1](model[0](x))
    h.retain_grad()
    delta = torch.randn(4, 3)
    (model[2](h) * delta).sum().backward()
    B = handle.feedback_weight("2")
    reference = torch.tensor([[sum(delta[n, o].item() * B[o, i].item() for o in range(3)) for i in range(7)] for n in range(4)])
    torch.testing.assert_close(h.grad, reference, rtol=1e-12, atol=1e-15)
    handle.remove()
    assert not hasattr(model[0], "feedback_scale")


@pytest.mark.parametrize("init,expected", [
    ("xavier", math.sqrt(2.0 / (3 * 9 + 5 * 9))),  # Conv2d(3, 5, 3): fan_in 27, fan_out 45 (BioTorch, init xavier)
    ("kaiming", 1.0 / math.sqrt(3 * 27)),          # PyTorch's default init's std (BioTorch otherwise)
    (0.25, 0.25),
    (lambda w: 2 * w.abs().max(), None),
])
def test_usf_scale_options(init, expected):
    conv = nn.Sequential(nn.Conv2d(3, 5, 3))
    if expected is None:
        expected = 2 * conv[0].weight.detach().abs().max().item()
    handle = fb.convert(conv, "usf", init=init)
    assert conv[0].feedback_scale.item() == pytest.approx(expected, rel=1e-12)
    assert fb.usf_scale(conv[0].weight, init) == pytest.approx(expected, rel=1e-12)
    handle.remove()


@pytest.mark.parametrize("init,match", [("rms", "must be one of std, xavier, kaiming"), (-1.0, "finite number > 0"),
                                        ("weight", "must be one of")])
def test_usf_bad_scale_is_refused_before_the_model_changes(init, match):
    model = _mlp()
    with pytest.raises(ValueError, match=match):
        fb.convert(model, "usf", init=init)
    assert fb.converted_layers(model) == {} and not hasattr(model[0], "feedback_scale")


def test_usf_scale_survives_a_state_dict_round_trip():
    model = _mlp()
    fb.convert(model, "usf", init=0.125)
    other = _mlp()
    fb.convert(other, "usf")
    other.load_state_dict(model.state_dict())
    assert other[0].feedback_scale.item() == 0.125


# --- weight-norm constraint ----------------------------------------------------------------------

def test_norm_constraint_keeps_the_initial_frobenius_norm_after_every_step():
    model = _mlp()
    layers = [model[0], model[2]]
    w0 = [m.weight.detach().clone() for m in layers]
    norms0 = [math.sqrt(sum(float(v) ** 2 for v in w.flatten())) for w in w0]
    assert fb.frobenius_norms(layers) == pytest.approx(norms0, rel=1e-12)
    fb.convert(model, "fa")
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    fb.constrain_norms_after_step(opt, layers)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    F.cross_entropy(model(x), y).backward()
    grads = [m.weight.grad.detach().clone() for m in layers]
    opt.step()
    for m, w, grad, n0 in zip(layers, w0, grads, norms0):
        stepped = w - 2.0 * grad  # plain SGD, then W * ||W_0|| / ||W||
        n1 = math.sqrt(sum(float(v) ** 2 for v in stepped.flatten()))
        torch.testing.assert_close(m.weight.detach(), stepped * (n0 / n1), rtol=1e-12, atol=1e-15)
    _sgd_steps(model, 3, opt)
    assert fb.frobenius_norms(layers) == pytest.approx(norms0, rel=1e-12)


def test_norm_constraint_refuses_bad_layers_and_norms():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="ReLU has no weight"):
        fb.constrain_norms_after_step(opt, [nn.ReLU()])
    with pytest.raises(ValueError, match="2 layers but 1 norms"):
        fb.constrain_norms_after_step(opt, [nn.Linear(2, 2), nn.Linear(2, 2)], norms=[1.0])
    with pytest.raises(ValueError, match="finite number > 0"):
        fb.constrain_norms_after_step(opt, [nn.Linear(2, 2)], norms=[0.0])
    assert not opt._optimizer_step_post_hooks


# --- Batch Manhattan (Liao, Leibo & Poggio 2016) ---------------------------------------------------

def test_batch_manhattan_steps_by_lr_times_the_sign_of_the_batch_gradient():
    """dW = -lr * sign(sum over the batch of dL_n/dW), the per-example gradients written out by hand."""
    torch.manual_seed(4)
    layer = nn.Linear(3, 2)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    x, t = torch.randn(5, 3), torch.randn(5, 2)
    opt = fb.BatchManhattan(torch.optim.SGD(layer.parameters(), lr=0.01))
    ((layer(x) - t) ** 2).sum().mul(0.5).backward()
    opt.step()
    gw = [[0.0] * 3 for _ in range(2)]
    gb = [0.0, 0.0]
    for n in range(5):  # L_n = 1/2 ||W x_n + b - t_n||^2: dL_n/dW = e_n x_n^T, dL_n/db = e_n
        e = [sum(w0[o, i].item() * x[n, i].item() for i in range(3)) + b0[o].item() - t[n, o].item() for o in range(2)]
        for o in range(2):
            gb[o] += e[o]
            for i in range(3):
                gw[o][i] += e[o] * x[n, i].item()
    sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[w0[o, i].item() - 0.01 * sign(gw[o][i]) for i in range(3)] for o in range(2)]))
    torch.testing.assert_close(layer.bias.detach(), torch.tensor([b0[o].item() - 0.01 * sign(gb[o]) for o in range(2)]))


# --- weight decay on W and B as the authors apply it -------------------------------------------------

def test_kp_w_minus_b_shrinks_by_one_minus_lr_decay_per_step_under_param_groups():
    lr, decay = 0.1, 0.05
    model = _mlp()
    handle = fb.convert(model, "kp", weight_decay=decay)
    groups = fb.param_groups(model, handle, weight_decay=1e-2)
    opt = torch.optim.SGD(groups, lr=lr)
    d0 = [(m.weight - m.feedback_weight).detach().clone() for m in (model[0], model[2])]
    for step in range(1, 5):
        _sgd_steps(model, 1, opt, seed=step)
        for m, d in zip((model[0], model[2]), d0):
            torch.testing.assert_close((m.weight - m.feedback_weight).detach(), d * (1 - lr * decay) ** step,
                                       rtol=1e-10, atol=1e-13)
    # the other parameters (the biases) decay at the optimizer's rate; W and B take no optimizer decay
    names = {g["name"]: g for g in opt.param_groups}
    assert names["decayed"]["weight_decay"] == 1e-2 and names["feedback pair"]["weight_decay"] == 0.0
    assert {id(p) for p in names["decayed"]["params"]} == {id(model[0].bias), id(model[2].bias)}


def test_kp_with_the_optimizer_decaying_w_too_breaks_the_shrinkage():
    """The grouping matters: the old benchmark's single group decays W at decay + weight_decay, B at decay."""
    lr, decay = 0.1, 0.05
    model = _mlp()
    fb.convert(model, "kp", weight_decay=decay)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=1e-2)
    d0 = (model[2].weight - model[2].feedback_weight).detach().clone()
    _sgd_steps(model, 1, opt)
    d1 = (model[2].weight - model[2].feedback_weight).detach()
    assert not torch.allclose(d1, d0 * (1 - lr * decay), rtol=1e-6)


def test_urfb_w_minus_b_stays_constant_with_momentum_and_weight_decay_elsewhere():
    model = _mlp()
    handle = fb.convert(model, "urfb")
    opt = torch.optim.SGD(fb.param_groups(model, handle, weight_decay=5e-2), lr=0.2, momentum=0.9, nesterov=True)
    d0 = [(m.weight - m.feedback_weight).detach().clone() for m in (model[0], model[2])]
    w0 = model[2].weight.detach().clone()
    _sgd_steps(model, 6, opt)
    assert not torch.allclose(model[2].weight.detach(), w0)
    for m, d in zip((model[0], model[2]), d0):
        torch.testing.assert_close((m.weight - m.feedback_weight).detach(), d, rtol=0, atol=1e-13)
    # decaying W only (an optimizer built from model.parameters() with weight decay) makes W - B drift
    naive = _mlp()
    fb.convert(naive, "urfb")
    opt = torch.optim.SGD(naive.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-2)
    d_naive = (naive[2].weight - naive[2].feedback_weight).detach().clone()
    _sgd_steps(naive, 6, opt)
    assert (naive[2].weight - naive[2].feedback_weight - d_naive).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["bp", "fa", "usf", "frsf", "brsf", "urfb", "kp"])
def test_param_groups_hold_every_trainable_parameter_once(mode):
    model = _mlp()
    model[0].bias.requires_grad_(False)
    handle = fb.convert(model, mode)
    groups = fb.param_groups(model, handle, 1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad) and len(ids) == len(set(ids))
    pair = [g for g in groups if g["name"] == "feedback pair"]
    if mode in ("urfb", "kp"):
        assert {id(p) for p in pair[0]["params"]} == {id(model[0].weight), id(model[2].weight),
                                                       id(model[0].feedback_weight), id(model[2].feedback_weight)}
    else:
        assert not pair


def test_param_groups_refuse_another_models_handle():
    handle = fb.convert(_mlp(), "kp")
    with pytest.raises(ValueError, match="are not in this Sequential"):
        fb.param_groups(_mlp(), handle, 1e-3)
    with pytest.raises(TypeError, match="handle returned by hebbloss.feedback.convert"):
        fb.param_groups(_mlp(), object(), 1e-3)


# --- Amit's deepernet_s ----------------------------------------------------------------------------

def test_amit_deep_s_is_his_deepernet_s():
    """_pars/deepernet_s.txt (yaliamit/URFB@17b91d1): (filters, kernel) of each conv, pools 3/3, 2/2, 2/2."""
    model = models.create("amit2019", net="deep_s", seed=0)
    convs = [(m.out_channels, m.kernel_size[0]) for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(16, 3), (16, 3), (64, 3), (64, 3), (64, 2), (64, 2)]
    pools = [(m.size, m.stride) for m in model.modules() if type(m).__name__ == "AmitMaxPool"]
    assert pools == [(3, 3), (2, 2), (2, 2)]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert model.dense.layer.in_features == 64 * 3 * 3 and model.final.in_features == 500
    assert model.settings.b_nonlin_scale == 0.0 and model.settings.batch_size == 500
