"""Real timm models (pretrained=False): every plastic layer's gradient is the rule's update computed
from the input and post signal that layer actually saw (Miconi 2021) - not merely "it runs".

This file's own forward hooks capture each plastic layer's input and output; the update is computed
in float64 by tests/reference.py from that input and the post signal attach() recorded, and compared
with the layer's gradient after ``plastic.loss().backward()``.
"""
import pytest
import timm
import timm.layers
import torch
from torch import nn

import hebbloss
from reference import D, RULES, channel_dim_of, decay_coefficients, layer_update, tf_same_pad

MODELS = {  # name: (timm kwargs, image size)
    "resnet18": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "mobilenetv3_small_100": ({}, 32),
    "convnext_atto": ({}, 32),
    "regnetx_002": ({}, 32),
    "vit_tiny_patch16_224": ({"img_size": 32}, 32),
    "tf_mobilenetv3_small_minimal_100": ({}, 33),  # timm Conv2dSame: dynamic, asymmetric padding
}


class RectifiedTanh(nn.Module):
    """y = tanh(relu(z)): a nonlinear, relu-like post signal."""

    def forward(self, z):
        return torch.tanh(torch.relu(z))


def _settings():
    """Every model runs Oja with a relu-like post, and one more rule with y = z (cycled over the rules)."""
    others = [r for r in RULES if r != "oja"]
    cases = []
    for i, name in enumerate(MODELS):
        cases.append(pytest.param(name, "oja", "relu_tanh", id=f"{name}-oja"))
        other = others[i % len(others)]
        cases.append(pytest.param(name, other, "identity", id=f"{name}-{other}"))
    return cases


# identity (post=None, y = z) also checks that in-place activations after a layer (the SiLU/ReLU
# (inplace=True) in timm's squeeze-excite blocks) do not change the recorded y.
POSTS = {"relu_tanh": RectifiedTanh(), "identity": None}


def _seen_input(layer, x):
    """The input the weight met: timm's Conv2dSame pads inside forward, as TensorFlow "SAME"."""
    if isinstance(layer, timm.layers.Conv2dSame):
        return tf_same_pad(x, layer.kernel_size, layer.stride, layer.dilation)
    return x


@pytest.mark.parametrize("model_name, rule, post_name", _settings())
def test_every_plastic_layer_gets_the_rule_update_of_what_it_saw(model_name, rule, post_name):
    _check_every_plastic_layer(model_name, rule, post_name)


@pytest.mark.parametrize("model_name, rule, post_name, reduction", [
    ("resnet18", "oja", "relu_tanh", "sum"), ("resnet18", "hebb", "identity", "mean"),
    ("convnext_atto", "softhebb", "relu_tanh", "sum"), ("convnext_atto", "oja", "identity", "mean"),
])
def test_streaming_gives_every_plastic_layer_the_rule_update_of_what_it_saw(model_name, rule, post_name, reduction):
    _check_every_plastic_layer(model_name, rule, post_name, reduction=reduction, streaming=True)


@pytest.mark.parametrize("model_name, rule", [("resnet18", "oja"), ("convnext_atto", "softhebb"),
                                              ("tf_mobilenetv3_small_minimal_100", "hebb")])
def test_streaming_one_sample_at_a_time_gives_the_same_updates(model_name, rule, monkeypatch):
    """The streamed sum y x taken per sample (hebbloss._local.CHUNK_BYTES below one sample) and summed."""
    import hebbloss._local
    monkeypatch.setattr(hebbloss._local, "CHUNK_BYTES", 1)
    _check_every_plastic_layer(model_name, rule, "relu_tanh", streaming=True)


def _check_every_plastic_layer(model_name, rule, post_name, reduction="sum", streaming=False):
    kwargs, size = MODELS[model_name]
    model = timm.create_model(model_name, pretrained=False, num_classes=4, **kwargs).to(D).train()
    post = POSTS[post_name]
    plastic = hebbloss.attach(model, rule=rule, post=post, reduction=reduction, streaming=streaming)
    layers = plastic.layers
    assert len(layers) > 10
    seen = {n: [] for n in layers}

    def capture(name):
        def hook(module, args, output):
            seen[name].append((args[0].detach().clone(), output.detach().clone()))
        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in layers.items()]
    model(torch.randn(2, 3, size, size, dtype=D))
    for h in handles:
        h.remove()
    posts = {n: [r.post for r in recs] for n, recs in plastic.records.items()}
    plastic.loss().backward()
    plastic.remove()

    for name, layer in layers.items():
        assert seen[name], f"{name} was never called"
        assert len(posts[name]) == len(seen[name])
        total = None
        for (x, z), recorded in zip(seen[name], posts[name]):
            y = z if post is None else post(z)  # z as it left the layer, before any in-place op after it
            if recorded is not None:  # None where y was larger than the weight and let go in the hook
                torch.testing.assert_close(recorded, y, rtol=0, atol=0)
            S = decay_coefficients(rule, y, z, channel_dim_of(layer))
            upd = [u for u in layer_update(layer, _seen_input(layer, x), y, S) if u is not None]
            if reduction == "mean":  # divided by samples x positions
                upd = [u * z.shape[channel_dim_of(layer)] / z.numel() for u in upd]
            total = upd if total is None else [t + u for t, u in zip(total, upd)]
        params = hebbloss.layers.plastic_parameters(layer)
        assert len(params) == len(total)
        for p, u in zip(params, total):
            scale = max(1.0, u.abs().max().item())
            torch.testing.assert_close(p.grad, -u, rtol=1e-9, atol=1e-9 * scale, msg=lambda m: f"{model_name}.{name}: {m}")
