"""hebbloss.optim: per-layer param groups, SoftHebb's learning-rate scaling (Journe et al. 2023) and
unit-norm filters after each step (Miconi 2021), each against a float64 computation written out by
hand; the old homes (hebbloss.softhebb, hebbloss.prune) still give the same functions."""
import math

import pytest
import torch
from torch import nn

import hebbloss
import hebbloss.init
from hebbloss import optim, prune, softhebb
from hebbloss.cli import build
from hebbloss.cli.config import ConfigError

D = torch.float64


def set_(param, values):
    with torch.no_grad():
        param.copy_(torch.tensor(values, dtype=param.dtype))


# ----------------------------------------------------------------------------- param groups
def three_layer_model():
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(2, 3, 3))
    model.add_module("conv2", nn.Conv2d(3, 4, 3, bias=False))
    model.add_module("fc", nn.Linear(4, 2))
    prune.random_connections(model.conv2, 0.5, seed=0)
    return model


@pytest.mark.parametrize("lr, layer_lr, want", [
    (0.1, None, {"conv1": 0.1, "conv2": 0.1, "fc": 0.1}),
    ({"conv1": 0.08, "conv2": 0.005, "fc": 0.01}, None, {"conv1": 0.08, "conv2": 0.005, "fc": 0.01}),
    (0.1, {"conv*": 0.01, "conv2": 0.002}, {"conv1": 0.01, "conv2": 0.002, "fc": 0.1}),   # the last match wins
    (0.1, {"conv2": 0.002, "conv*": 0.01}, {"conv1": 0.01, "conv2": 0.01, "fc": 0.1}),
    ({"conv1": 0.5, "conv2": 0.25, "fc": 0.0}, {"^fc$": 0.3}, {"conv1": 0.5, "conv2": 0.25, "fc": 0.3}),
])
def test_param_groups_carry_each_layers_rate_and_every_plastic_parameter_once(lr, layer_lr, want):
    model = three_layer_model()
    plastic = hebbloss.attach(model, rule="oja")
    groups = optim.param_groups(plastic, lr, layer_lr)
    assert [g["name"] for g in groups] == ["conv1", "conv2", "fc"]
    assert {g["name"]: g["lr"] for g in groups} == want
    expected = {"conv1": [model.conv1.weight, model.conv1.bias], "conv2": [model.conv2.weight_orig],
                "fc": [model.fc.weight, model.fc.bias]}
    for g in groups:
        assert [id(p) for p in g["params"]] == [id(p) for p in expected[g["name"]]]
    every = [id(p) for g in groups for p in g["params"]]
    assert len(every) == len(set(every)) == 5
    assert set(every) == {id(p) for p in plastic.plastic_parameters()}
    opt = torch.optim.SGD(groups, lr=0.0)   # torch accepts them: no parameter twice
    assert [g["lr"] for g in opt.param_groups] == [want[n] for n in ("conv1", "conv2", "fc")]
    plastic.remove()


def test_param_groups_take_a_mapping_of_layers_too():
    lin = nn.Linear(3, 2)
    groups = optim.param_groups({"a": lin}, 0.2)
    assert groups == [{"params": [lin.weight, lin.bias], "lr": 0.2, "name": "a"}]


@pytest.mark.parametrize("lr, layer_lr, message", [
    ({"conv1": 0.1}, None, r"learning rates given for \[\] \(not plastic\) and missing for \['conv2', 'fc'\]"),
    ({"conv1": 0.1, "conv2": 0.1, "fc": 0.1, "conv9": 0.1}, None, r"given for \['conv9'\] \(not plastic\)"),
    (0.1, {"conv7": 0.1}, "layer_lr pattern 'conv7' matches none of the plastic layers: conv1, conv2, fc"),
    (float("nan"), None, "learning rate of layer 'conv1' must be a finite number >= 0, got nan"),
    (0.1, {"fc": -0.5}, "learning rate of layer 'fc' must be a finite number >= 0, got -0.5"),
    ({"conv1": 0.1, "conv2": float("inf"), "fc": 0.1}, None, "learning rate of layer 'conv2' must be"),
    (0.1, {"conv2": "0.1"}, "learning rate of layer 'conv2' must be a finite number >= 0, got '0.1'"),
    (True, None, "learning rate of layer 'conv1'"),
])
def test_bad_rates_are_refused_naming_the_layer(lr, layer_lr, message):
    plastic = hebbloss.attach(three_layer_model(), rule="oja")
    with pytest.raises(ValueError, match=message):
        optim.param_groups(plastic, lr, layer_lr)
    plastic.remove()


# ------------------------------------------------------------------- SoftHebb rate scaling
def test_scaling_of_a_known_gradient_by_hand():
    lin = nn.Linear(3, 2).double()
    set_(lin.weight, [[3.0, 4.0, 0.0], [0.0, 0.0, 0.5]])        # unit norms 5 and 0.5
    set_(lin.bias, [1.0, -2.0])
    opt = torch.optim.SGD(optim.param_groups({"fc": lin}, 0.1), lr=0.0)
    handle = optim.scale_updates(opt, {"fc": lin}, power=0.5)
    lin.weight.grad = torch.tensor([[1.0, -2.0, 0.5], [4.0, 0.0, -1.0]], dtype=D)
    lin.bias.grad = torch.tensor([0.25, -8.0], dtype=D)
    opt.step()
    # peak |grad| over weight and bias: 8; rates sqrt(|5 - 1| + 1e-10) and sqrt(|0.5 - 1| + 1e-10)
    r0, r1 = math.sqrt(4 + 1e-10), math.sqrt(0.5 + 1e-10)
    want_w = [[3.0 - 0.1 * r0 * 1.0 / 8, 4.0 - 0.1 * r0 * -2.0 / 8, 0.0 - 0.1 * r0 * 0.5 / 8],
              [0.0 - 0.1 * r1 * 4.0 / 8, 0.0 - 0.1 * r1 * 0.0 / 8, 0.5 - 0.1 * r1 * -1.0 / 8]]
    want_b = [1.0 - 0.1 * r0 * 0.25 / 8, -2.0 - 0.1 * r1 * -8.0 / 8]
    assert torch.allclose(lin.weight.detach(), torch.tensor(want_w, dtype=D), rtol=1e-12, atol=1e-14)
    assert torch.allclose(lin.bias.detach(), torch.tensor(want_b, dtype=D), rtol=1e-12, atol=1e-14)
    handle.remove()
    handle.remove()  # a second call does nothing
    w = lin.weight.detach().clone()
    lin.weight.grad = torch.ones(2, 3, dtype=D)
    lin.bias.grad = None
    opt.step()  # hook off: plain SGD
    assert torch.allclose(lin.weight.detach(), w - 0.1)


def test_scaling_without_normalisation_and_another_power_on_a_transposed_conv():
    conv = nn.ConvTranspose2d(2, 3, 1, bias=False).double()       # weight [in=2, out=3, 1, 1]; unit o = weight[:, o]
    set_(conv.weight, [[[[2.0]], [[0.0]], [[1.0]]], [[[0.0]], [[3.0]], [[1.0]]]])   # unit norms 2, 3, sqrt(2)
    opt = torch.optim.SGD(optim.param_groups({"up": conv}, 1.0), lr=0.0)
    optim.scale_updates(opt, {"up": conv}, power=2.0, normalize=False)
    grad = [[[[1.0]], [[-1.0]], [[2.0]]], [[[0.5]], [[4.0]], [[-3.0]]]]
    conv.weight.grad = torch.tensor(grad, dtype=D)
    w0 = conv.weight.detach().clone()
    opt.step()
    rates = [(abs(2.0 - 1) + 1e-10) ** 2, (abs(3.0 - 1) + 1e-10) ** 2, (abs(math.sqrt(2.0) - 1) + 1e-10) ** 2]
    for i in range(2):
        for o in range(3):
            want = float(w0[i, o, 0, 0]) - rates[o] * grad[i][o][0][0]
            assert abs(float(conv.weight.detach()[i, o, 0, 0]) - want) < 1e-12


@pytest.mark.parametrize("power", [-0.5, float("nan"), float("inf"), "0.5", True])
def test_bad_power_is_refused_and_no_hook_is_placed(power):
    lin = nn.Linear(2, 2).double()
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="power must be a finite number >= 0"):
        optim.scale_updates(opt, {"fc": lin}, power=power)
    w = lin.weight.detach().clone()
    lin.weight.grad = torch.full((2, 2), 3.0, dtype=D)
    opt.step()
    assert torch.allclose(lin.weight.detach(), w - 3.0)   # unscaled


def test_parameters_missing_from_the_optimizer_are_named():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"layers b are not in the optimizer.*hebbloss.optim.param_groups"):
        optim.scale_updates(opt, {"a": a, "b": b})


# ----------------------------------------------------------------------- unit-norm filters
def test_renormalisation_after_a_step_gives_unit_norms_and_keeps_pruned_entries_zero():
    conv = nn.Conv2d(2, 3, 2, bias=False).double()
    prune.random_connections(conv, 0.5, seed=1)
    opt = torch.optim.SGD(conv.parameters(), lr=0.3)
    handle = optim.renormalize_after_step(opt, [conv], norm=2.0)
    conv.weight_orig.grad = torch.randn(conv.weight_orig.shape, dtype=D)
    before = (conv.weight_orig - 0.3 * conv.weight_orig.grad).detach().clone()
    opt.step()
    mask = conv.weight_mask
    w = (conv.weight_orig * mask).detach()
    for c in range(3):
        kept = [float(before[c].flatten()[j]) for j in range(8) if mask[c].flatten()[j] == 1]
        norm = math.sqrt(sum(v * v for v in kept))
        for j in range(8):
            want = float(before[c].flatten()[j]) * 2.0 / norm if mask[c].flatten()[j] == 1 else 0.0
            assert abs(float(w[c].flatten()[j]) - want) < 1e-12
    conv(torch.zeros(1, 2, 2, 2, dtype=D))  # the forward recomputes weight from weight_orig * mask
    assert torch.all(conv.weight[mask == 0] == 0)
    handle.remove()
    handle.remove()  # a second call does nothing
    w = conv.weight_orig.detach().clone()
    conv.weight_orig.grad = torch.ones_like(w)
    opt.step()  # hook off: no renormalisation
    assert torch.allclose(conv.weight_orig.detach(), w - 0.3)


@pytest.mark.parametrize("norm", [0.0, -1.0, float("nan"), "1"])
def test_bad_norm_is_refused_before_anything_changes(norm):
    lin = nn.Linear(3, 2)
    w = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="norm must be a finite number > 0"):
        optim.renormalize_filters(lin, norm)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="norm must be a finite number > 0"):
        optim.renormalize_after_step(opt, [lin], norm)
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert torch.equal(lin.weight.detach(), w)


# ----------------------------------------------------------------- the command line and recipes
def test_recipe_groups_come_from_param_groups():
    model = hebbloss.models.create("miconi2021", channels=[4, 6, 8], pruning=False)
    plastic = model.recipe.attach(model)
    opt = model.recipe.optimizer(plastic)
    want = optim.param_groups(plastic, {n: lay.lr for n, lay in model.recipe.layers.items()})
    assert [(g["name"], g["lr"], [id(p) for p in g["params"]]) for g in opt.param_groups] == \
           [(g["name"], g["lr"], [id(p) for p in g["params"]]) for g in want]
    plastic.remove()


def test_command_line_refuses_a_non_finite_rate_before_changing_the_model():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3))
    cfg = {"lr": float("nan"), "optimizer": "sgd", "prune": 0.5}
    with pytest.raises(ConfigError, match="learning rate of layer '0' must be a finite number >= 0, got nan"):
        build.build_generic(cfg, model, [])
    assert not hasattr(model[2], "weight_orig")   # not pruned
    hebbloss.attach(model, rule="oja").remove()   # not left plastic
    ref = hebbloss.models.create("miconi2021", channels=[4, 6, 8], pruning=False)
    with pytest.raises(ConfigError, match="learning rate of layer 'conv3' must be"):
        build.build_reference({"layer_lr": {"conv3": float("inf")}}, ref, ref.recipe, [])
    hebbloss.attach(ref, rule="oja").remove()


def test_command_line_layer_lr_patterns_set_the_reference_networks_rates():
    ref = hebbloss.models.create("miconi2021", channels=[4, 6, 8], pruning=False)
    built = build.build_reference({"lr": 0.5, "layer_lr": {"conv*": "1e-3", "conv3": 0.25}}, ref, ref.recipe, [])
    assert [(g["name"], g["lr"]) for g in built.optimizer.param_groups] == [("conv1", 1e-3), ("conv2", 1e-3), ("conv3", 0.25)]
    built.plastic.remove()


# ------------------------------------------------------------------------- the old homes
def test_old_names_are_the_new_functions():
    assert softhebb.scale_updates is optim.scale_updates and softhebb.param_groups is optim.param_groups
    assert softhebb.maxabs_normalize is optim.maxabs_normalize and softhebb.norm_rate is optim.norm_rate
    assert softhebb.UpdateScaling is optim.UpdateScaling and softhebb.init_radius is hebbloss.init.init_radius
    assert prune.renormalize_filters is optim.renormalize_filters
    assert prune.renormalize_after_step is optim.renormalize_after_step
