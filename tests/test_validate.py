"""hebbloss.validate: lists, before anything changes, the layers attach/convert would change and the
ones they cannot, with the reasons; strict raises with the full list; attach and convert use it."""
import functools
from collections import OrderedDict

import pytest
import timm
import timm.layers
import torch
from torch import nn

import hebbloss
from hebbloss import feedback as fb

PLAIN = (nn.Linear, nn.Conv2d, timm.layers.Linear, timm.layers.Conv2dSame)  # classes that compute W*x + b as such


def _resnetv2_std():
    """A small timm ResNetV2: every conv is a StdConv2d (weight standardisation), the head a Conv2d."""
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2([1, 1, 1, 1], channels=(16, 32, 64, 128), stem_chs=16, num_classes=4,
                    norm_layer=functools.partial(timm.layers.GroupNormAct, num_groups=4))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _hooks(model):
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for n, m in model.named_modules()]


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


ZOO = {  # the models of tests/test_timm_zoo.py: name -> (timm kwargs, image size)
    "resnet18": ({}, 32), "efficientnet_b0": ({}, 32), "mobilenetv3_small_100": ({}, 32), "convnext_atto": ({}, 32),
    "regnetx_002": ({}, 32), "vit_tiny_patch16_224": ({"img_size": 32}, 32), "tf_mobilenetv3_small_minimal_100": ({}, 33),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_a_timm_zoo_model_lists_every_layer_with_its_family(name):
    kwargs, size = ZOO[name]
    model = timm.create_model(name, pretrained=False, num_classes=4, **kwargs)
    state, hooks = _state(model), _hooks(model)
    report = hebbloss.validate(model, rule="oja")
    expected = [n for n, m in model.named_modules() if type(m) in PLAIN]
    assert [n for n, _ in report.chosen] == expected and report.ok
    kinds = {n: type(m) for n, m in model.named_modules()}
    for n, family in report.chosen:
        assert family == {nn.Linear: "linear", timm.layers.Linear: "linear", nn.Conv2d: "conv2d",
                          timm.layers.Conv2dSame: "conv2d_same"}[kinds[n]]
    assert _same_state(state, _state(model)) and _hooks(model) == hooks
    if name.startswith("tf_"):
        assert any(f == "conv2d_same" for _, f in report.chosen)  # the dynamic "SAME" layers are in
    with hebbloss.attach(model, rule="oja") as plastic:
        assert list(plastic.layers) == expected
        model(torch.randn(2, 3, size, size))
        plastic.loss()


def test_std_conv_layers_are_refused_with_the_reason_and_nothing_changes():
    model = _resnetv2_std()
    state, hooks = _state(model), _hooks(model)
    report = hebbloss.validate(model)
    std = [n for n, m in model.named_modules() if isinstance(m, timm.layers.StdConv2d)]
    assert len(std) == 17
    assert [n for n, _ in report.refused] == std
    assert all(r.startswith("StdConv2d overrides forward() of Conv2d") for _, r in report.refused)
    assert report.chosen == [("head.fc", "conv2d")] and not report.ok
    assert _same_state(state, _state(model)) and _hooks(model) == hooks
    text = str(report)
    assert "1 layer(s) would be made plastic" in text and "17 layer(s) cannot be made plastic" in text
    assert all(f"  - {n}: StdConv2d overrides forward()" in text for n in std)

    with pytest.raises(ValueError) as strict:
        hebbloss.validate(model, strict=True)
    assert all(f"  - {n}: StdConv2d overrides" in str(strict.value) for n in std)
    with pytest.raises(ValueError) as attached:  # attach goes through validate: the same list, nothing placed
        hebbloss.attach(model)
    assert str(attached.value) == str(strict.value) == report.message()
    assert _same_state(state, _state(model)) and _hooks(model) == hooks

    assert hebbloss.validate(model, targets="head.fc", strict=True).chosen == [("head.fc", "conv2d")]


def test_strict_lists_every_problem_and_the_rule():
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3), std=timm.layers.StdConv2d(4, 4, 3), bn=nn.BatchNorm2d(4),
        normed=nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 1)), fc=nn.Linear(4, 2)))
    report = hebbloss.validate(model, targets=["conv", "std", "bn", "normed", "fc"], rule="ojaa")
    assert [n for n, _ in report.chosen] == ["conv", "fc"]
    assert [n for n, _ in report.refused] == ["std", "bn", "normed"]
    assert len(report.problems) == 1 and "unknown rule 'ojaa'" in report.problems[0]
    with pytest.raises(ValueError, match=r"(?s)unknown rule 'ojaa'.*cannot be made plastic:\n  - std: .*\n  - bn: "
                                         r"BatchNorm2d is not a registered layer type.*\n  - normed: .*parametrized"):
        hebbloss.validate(model, targets=["conv", "std", "bn", "normed", "fc"], rule="ojaa", strict=True)
    assert hebbloss.validate(model, targets=["conv", "fc"], rule="oja").ok

    nothing = hebbloss.validate(model, targets="conv9")
    assert not nothing.ok and "targets='conv9' matched no module of Sequential" in nothing.problems[0]
    empty = hebbloss.validate(nn.Sequential(nn.ReLU()))
    assert empty.problems == ["Sequential has no layer that can be made plastic (supported: "
                              + ", ".join(hebbloss.layers.supported_names()) + ")"]
    with pytest.raises(ValueError, match="purpose must be one of 'plastic', 'feedback'"):
        hebbloss.validate(model, purpose="probe")
    with pytest.raises(TypeError, match="a target must be a string"):
        hebbloss.validate(model, targets=[42])


def test_feedback_purpose_accepts_locally_connected_layers_that_attach_skips():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(OrderedDict(lc=fb.LocallyConnected2d.from_conv(conv, 6), flat=nn.Flatten(),
                                      fc=nn.Linear(4 * 36, 2)))
    assert hebbloss.validate(model).chosen == [("fc", "linear")]  # skipped by default, as attach does
    refused = hebbloss.validate(model, targets="lc")
    assert refused.refused[0][0] == "lc" and "cannot be made plastic" in refused.refused[0][1]
    assert hebbloss.validate(model, purpose="feedback").chosen == [("lc", "locally_connected2d"), ("fc", "linear")]
    with hebbloss.attach(model) as plastic:
        assert list(plastic.layers) == ["fc"]
    handle = fb.convert(model, "fa")
    assert list(handle.layers) == ["lc", "fc"]
    again = hebbloss.validate(model, purpose="feedback")
    assert again.ok  # validate knows layer families; convert adds that these are converted already
    with pytest.raises(ValueError, match=r"(?s)cannot be converted to feedback learning:\n  - lc: already converted"):
        fb.convert(model, "usf")
    handle.remove()


def test_a_layer_its_parent_bypasses_is_refused():
    attn = nn.MultiheadAttention(8, 2)
    report = hebbloss.validate(nn.Sequential(attn))
    assert report.refused and report.refused[0][0] == "0.out_proj"
    assert "nn.MultiheadAttention" in report.refused[0][1]
