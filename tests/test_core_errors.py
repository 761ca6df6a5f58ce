"""Every bad input gets a clear error naming the layer / the valid options, and changes nothing:
no hook is left or added, no record is added or dropped, the layers stay free to attach (Miconi 2021)."""
import math

import pytest
import torch
from torch import nn

import hebbloss

D = torch.float64
RULE_NAMES = ("hebb", "instar", "oja", "softhebb")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv1(x)).mean(dim=(2, 3)))


def _net():
    return Net().to(D)


def _x(nan=False):
    x = torch.randn(2, 2, 5, 5, dtype=D)
    if nan:
        x[0, 0, 0, 0] = math.nan
    return x


def _hooks(model):
    dicts = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
             "_backward_hooks")
    return {(n, d): list(getattr(m, d)) for n, m in model.named_modules() for d in dicts}


def _no_hooks(model):
    return all(not v for v in _hooks(model).values())


def _records(plastic):
    """Snapshot of the records: the same Record objects in the same order."""
    return {n: [id(r) for r in recs] for n, recs in plastic.records.items()}


def _still_free(model):
    """Nothing half-attached is left: the model's layers can be attached again."""
    hebbloss.attach(model).remove()
    assert _no_hooks(model)


# --------------------------------------------------------------------------- attach-time errors


def test_unknown_rule_lists_the_valid_ones():
    model = _net()
    with pytest.raises(ValueError, match="unknown rule 'ojaa'") as err:
        hebbloss.attach(model, rule="ojaa")
    assert all(name in str(err.value) for name in RULE_NAMES)
    assert "Rule subclass" in str(err.value)  # and how to bring one's own
    assert _no_hooks(model)
    _still_free(model)


def test_unknown_rule_in_overrides_changes_nothing():
    model = _net()
    with pytest.raises(ValueError, match="unknown rule 'bogus'.*hebb, instar, oja, softhebb"):
        hebbloss.attach(model, rule="oja", overrides={"fc": {"rule": "bogus"}})
    assert _no_hooks(model)
    _still_free(model)


def test_unknown_rule_in_surrogate_loss():
    layer = nn.Linear(2, 2)
    z = layer(torch.randn(3, 2))
    with pytest.raises(ValueError, match="unknown rule 42.*hebb, instar, oja, softhebb"):
        hebbloss.surrogate_loss(layer, z, z.detach(), rule=42)


def test_targets_matching_nothing_list_what_the_model_has():
    model = _net()
    with pytest.raises(ValueError, match=r"targets='conv9' matched no module of Net") as err:
        hebbloss.attach(model, targets="conv9")
    assert "conv1 (Conv2d)" in str(err.value) and "fc (Linear)" in str(err.value)
    assert _no_hooks(model)
    with pytest.raises(ValueError, match="matched no module"):
        hebbloss.attach(model, targets=[nn.Conv3d, lambda n, m: False])
    assert _no_hooks(model)
    _still_free(model)


def test_target_of_a_wrong_kind_is_named():
    model = _net()
    with pytest.raises(TypeError, match="a target must be a string, a type or a callable.*42"):
        hebbloss.attach(model, targets=[42])
    assert _no_hooks(model)


def test_a_model_without_supported_layers():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="Sequential has no layer that can be made plastic.*Linear, Conv"):
        hebbloss.attach(model)
    assert _no_hooks(model)


def test_an_unsupported_layer_named_explicitly():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match=r"  - 1: BatchNorm1d is not a registered layer type \(supported: .*Linear"):
        hebbloss.attach(model, targets=["0", "1"])
    assert _no_hooks(model)
    _still_free(model)


def test_overrides_pattern_matching_nothing_and_unknown_key():
    model = _net()
    with pytest.raises(ValueError, match=r"overrides pattern 'conv7' matches none of the plastic layers: conv1, fc"):
        hebbloss.attach(model, overrides={"conv7": {"rule": "oja"}})
    with pytest.raises(ValueError, match=r"overrides\['fc'\] has unknown keys \['lr'\]; allowed: 'rule', 'post'"):
        hebbloss.attach(model, overrides={"fc": {"lr": 0.1}})
    assert _no_hooks(model)
    _still_free(model)


def test_bad_reduction():
    model = _net()
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean', got 'max'"):
        hebbloss.attach(model, reduction="max")
    assert _no_hooks(model)
    layer = nn.Linear(2, 2)
    z = layer(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"reduction must be one of \('sum', 'mean'\), got 'max'"):
        hebbloss.surrogate_loss(layer, z, z.detach(), reduction="max")


def test_attaching_twice_to_one_layer():
    model = _net()
    first = hebbloss.attach(model, rule="oja", targets="conv1")
    hooks = _hooks(model)
    with pytest.raises(ValueError, match=r"layers conv1 are already plastic.*call \.remove\(\) on that handle first"):
        hebbloss.attach(model, rule="hebb")  # conv1 clashes; fc must not be left half-attached
    assert _hooks(model) == hooks
    model(_x())
    assert len(first.records["conv1"]) == 1  # the first handle still works, alone
    first.loss()
    first.remove()
    _still_free(model)


def test_attaching_the_same_model_twice_names_every_layer():
    model = _net()
    with hebbloss.attach(model):
        with pytest.raises(ValueError, match="layers conv1, fc are already plastic"):
            hebbloss.attach(model)
    _still_free(model)


@pytest.mark.parametrize("post, shown", [
    ("wta:3", r"post 'wta:3' is not understood as a post signal; valid names: identity \(or none.*relu, kwta\[:K\[:MU\]\].*"
              r"softwta\[:BETA\].*triangle\[:POWER\]"),
    ("relu6", r"post 'relu6' is not understood as a post signal"),
    ("kwta:x", r"post 'kwta:x': K must be an integer, got 'x'"),
    ("kwta:0", r"post 'kwta:0': KWTA: k must be a positive integer"),
    ("softwta:-1", r"post 'softwta:-1': SoftWTA: inverse_temperature must be a finite number > 0"),
])
def test_a_post_name_that_is_not_known_is_refused_at_attach(post, shown):
    """A post given by an unknown name used to be accepted and fail at the first forward."""
    model = _net()
    with pytest.raises(ValueError, match=shown):
        hebbloss.attach(model, post=post)
    with pytest.raises(ValueError, match=r"overrides\['fc'\]\['post'\] " + shown[len("post "):]):
        hebbloss.attach(model, overrides={"conv1": {"rule": "oja"}, "fc": {"post": post}})
    assert _no_hooks(model)
    _still_free(model)


def test_a_post_that_is_neither_callable_nor_a_name_is_refused_at_attach():
    model = _net()
    with pytest.raises(TypeError, match=r"post must be None, a callable mapping a layer's output to its post signal, "
                                        r"or a name \(identity, none, relu, kwta, softwta, triangle\), got int"):
        hebbloss.attach(model, post=3)
    with pytest.raises(TypeError, match=r"overrides\['conv1'\]\['post'\] must be None, a callable.*got list"):
        hebbloss.attach(model, overrides={"conv1": {"post": [nn.ReLU()]}})
    with pytest.raises(ValueError, match=r"layer 'conv1': KWTA: k=4 winners but the layer has only 3 channels"):
        hebbloss.attach(model, post="kwta:4", targets="conv1")
    assert _no_hooks(model)
    _still_free(model)


# --------------------------------------------------------------------------- forward-time errors


@pytest.mark.parametrize(
    "post, shown",
    [
        (lambda z: z.flatten(1), r"has shape \(2, \d+\), but the layer's output has shape \(2, 3, 3, 3\)"),
        (lambda z: z.sum(), r"has shape \(\), but the layer's output"),
        (lambda z: (z, z), r"has shape tuple, but the layer's output"),
    ],
)
def test_post_of_the_wrong_shape_names_the_layer(post, shown):
    model = _net()
    plastic = hebbloss.attach(model, post=post)
    hooks = _hooks(model)
    with pytest.raises(ValueError, match=r"the post signal of layer 'conv1' " + shown + ".*same shape"):
        model(_x())
    assert _records(plastic) == {"conv1": [], "fc": []}
    assert _hooks(model) == hooks
    plastic.remove()


def test_post_of_the_wrong_shape_on_a_later_layer_keeps_its_records():
    model = _net()
    post = lambda z: z if z.shape[0] == 2 else z[:, :1]  # noqa: E731  (breaks on a batch of 3)
    plastic = hebbloss.attach(model, rule="oja", overrides={"fc": {"post": post}})
    model(_x())
    snapshot, hooks = _records(plastic), _hooks(model)
    with pytest.raises(ValueError, match=r"the post signal of layer 'fc' has shape \(3, 1\), but the layer's output has shape \(3, 2\)"):
        model(torch.randn(3, 2, 5, 5, dtype=D))
    assert _records(plastic)["fc"] == snapshot["fc"]
    assert _hooks(model) == hooks
    plastic.remove()


def test_wrong_post_shape_in_surrogate_loss():
    layer = nn.Linear(2, 3)
    z = layer(torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"post has shape \(4, 2\) but the layer's output has shape \(4, 3\)"):
        hebbloss.surrogate_loss(layer, z, torch.zeros(4, 2))


def test_bare_weight_of_a_wrong_rank():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"bare weight must have 2 \(linear\) to 5 \(conv3d\) dimensions, got shape \(3,\)"):
        hebbloss.surrogate_loss(w, torch.zeros(2, 3), torch.zeros(2, 3))


def test_surrogate_loss_of_an_unsupported_module():
    bn = nn.BatchNorm1d(3)
    z = bn(torch.randn(4, 3))
    with pytest.raises(hebbloss.layers.UnsupportedLayer, match="BatchNorm1d is not a registered layer type"):
        hebbloss.surrogate_loss(bn, z, z.detach())


# --------------------------------------------------------------------------- loss()-time errors


def test_loss_without_a_recorded_forward():
    model = _net()
    plastic = hebbloss.attach(model)
    with pytest.raises(RuntimeError, match=r"no forward pass of Net was recorded.*run model\(x\) with gradients enabled"):
        plastic.loss()
    with torch.no_grad():
        model(_x())  # nothing is recorded under no_grad ...
    with torch.inference_mode():
        model(_x())  # ... nor under inference_mode
    assert _records(plastic) == {"conv1": [], "fc": []}
    with pytest.raises(RuntimeError, match="no forward pass of Net was recorded"):
        plastic.loss()
    plastic.remove()


def test_loss_under_no_grad_keeps_the_records():
    model = _net()
    plastic = hebbloss.attach(model, rule="oja")
    model(_x())
    snapshot = _records(plastic)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"loss\(\) was called under torch.no_grad\(\); call it where gradients are enabled"):
            plastic.loss()
    assert _records(plastic) == snapshot
    plastic.loss().backward()  # still usable
    assert model.fc.weight.grad is not None
    plastic.remove()


def _all_empty(plastic):
    return all(not recs for recs in plastic.records.values())


def test_nan_in_the_input_names_the_layer_and_the_input_and_a_clean_batch_then_trains():
    """One batch with NaN used to leave its records behind, so every later clean batch raised too."""
    model = _net()
    plastic = hebbloss.attach(model, rule="oja")
    model(_x(nan=True))
    with pytest.raises(FloatingPointError, match=r"layer 'conv1' produced NaN or Inf in its output from a finite "
                                                 r"weight and bias: its input held NaN or Inf \(the model input"):
        plastic.loss()
    assert _all_empty(plastic)  # dropped with the error
    x = _x()
    model(x)
    assert [len(r) for r in plastic.records.values()] == [1, 1]
    total = plastic.loss()
    plastic.remove()
    fresh = hebbloss.attach(model, rule="oja")  # what the clean batch alone gives
    model(x)
    assert torch.isfinite(total) and torch.equal(total, fresh.loss())
    fresh.remove()


def test_nan_in_the_weights_says_the_weights_diverged():
    model = _net()
    with torch.no_grad():
        model.fc.weight[0, 1] = math.nan
    plastic = hebbloss.attach(model, rule="oja")
    model(_x())
    with pytest.raises(FloatingPointError, match=r"layer 'fc' has NaN or Inf in its weight: the weights diverged"):
        plastic.loss()
    assert _all_empty(plastic)
    plastic.remove()


@pytest.mark.parametrize("detach_input", [True, False])
def test_a_model_on_the_meta_device_gives_a_meta_loss(detach_input):
    """The finite check used to read the meta loss's value (Tensor.item() cannot be called on meta tensors)."""
    model = Net().to("meta")
    plastic = hebbloss.attach(model, rule="oja", post=hebbloss.KWTA(k=1), detach_input=detach_input)
    model(torch.empty(2, 2, 5, 5, device="meta"))
    loss = plastic.loss()
    assert loss.is_meta and loss.shape == ()
    loss.backward()
    params = plastic.plastic_parameters()
    assert len(params) == 4 and all(p.grad.is_meta and p.grad.shape == p.shape for p in params)
    assert _all_empty(plastic)
    plastic.remove()
    assert _no_hooks(model)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_inf_or_nan_in_a_post_names_the_layer(bad):
    model = _net()
    plastic = hebbloss.attach(model, rule="instar", overrides={"fc": {"post": lambda z: z.clone().fill_(bad)}})
    model(_x())
    with pytest.raises(FloatingPointError, match=r"layer 'fc' produced NaN or Inf in its post signal"):
        plastic.loss()
    assert _all_empty(plastic)
    plastic.remove()
    assert _no_hooks(model)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_inf_or_nan_in_a_post_that_was_let_go_names_the_layer(bad):
    """y (2x3x7x7) larger than the weight (3x2x3x3): its update is taken in the hook and y let go, so
    the layer is found by its term <y, z>."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(147, 2)).to(D)
    plastic = hebbloss.attach(model, rule="oja", overrides={"0": {"post": lambda z: z.clone().fill_(bad)}})
    model(torch.randn(2, 2, 9, 9, dtype=D))
    assert plastic.records["0"][0].post is None
    with pytest.raises(FloatingPointError, match=r"layer '0' produced NaN or Inf in its post signal"):
        plastic.loss()
    assert _all_empty(plastic)
    plastic.remove()


def test_a_failing_forward_leaves_no_records_of_earlier_layers():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    bad_post = {"1": {"post": lambda z: z[..., :1]}}  # wrong shape, raised at the second layer
    plastic = hebbloss.attach(model, rule="oja", overrides=bad_post)
    with pytest.raises(ValueError, match="layer '1'"):
        model(torch.randn(5, 4))
    assert all(len(r) == 0 for r in plastic.records.values())
    with pytest.raises(RuntimeError, match="no forward pass"):
        plastic.loss()
    plastic.remove()


class _FailsAfter(nn.Module):
    """Two plastic convs, then a step that fails when asked to."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 1)
        self.fail = False

    def forward(self, x):
        z = self.b(torch.relu(self.a(x)))
        if self.fail:
            raise RuntimeError("the model failed after its plastic layers")
        return z


@pytest.mark.parametrize("streaming", [False, True])
def test_a_forward_that_fails_after_the_plastic_layers_leaves_grad_mode_records_and_thresholds_as_they_were(streaming):
    model = _FailsAfter()
    plastic = hebbloss.attach(model, rule="oja", post=hebbloss.KWTA(k=1, homeostasis=0.5), streaming=streaming)
    x = torch.randn(3, 2, 5, 5)
    model(x)  # one good forward: records and moved thresholds are kept
    before = {k: v.clone() for k, v in plastic.state_dict().items()}
    assert any(v.abs().sum() > 0 for v in before.values()), "homeostasis must have moved the thresholds"
    counts = {n: len(r) for n, r in plastic.records.items()}
    model.fail = True
    with pytest.raises(RuntimeError, match="failed after its plastic layers"):
        model(x)
    assert torch.is_grad_enabled()  # streaming suspends the graph during the forward; a failure restores it
    assert {n: len(r) for n, r in plastic.records.items()} == counts
    for k, v in plastic.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} moved in the failed forward"
    model.fail = False
    model(x)  # and the next forward records and adapts as usual
    assert all(len(r) == 2 for r in plastic.records.values())
    assert any(not torch.equal(v, before[k]) for k, v in plastic.state_dict().items())
    plastic.remove()
    assert _no_hooks(model)


def test_multihead_attention_out_proj_is_refused_because_its_forward_never_runs():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    with pytest.raises(ValueError, match=r"self_attn\.out_proj: its parent nn\.MultiheadAttention"):
        hebbloss.attach(layer, rule="oja")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules())
    plastic = hebbloss.attach(layer, rule="oja", targets=["linear1", "linear2"])
    layer(torch.randn(2, 3, 8))
    assert set(plastic.layers) == {"linear1", "linear2"} and plastic.loss().requires_grad
    plastic.remove()
