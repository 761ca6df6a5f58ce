"""A Hebbian step under torch.compile, bf16 autocast (CPU), fp16 autocast with GradScaler (CUDA) and
channels_last gives the rule's update (Miconi 2021): each .grad is compared with minus the float64
reference update of tests/reference.py, computed from a float64 copy of the network's own inputs.

Documented tolerances (max |error| / max |reference| per parameter, also in docs/performance.md):
float32 paths (eager, compiled, channels_last) 1e-4; bfloat16 autocast 2e-2 (bf16 keeps 8 bits of
mantissa: 3.9e-3 relative per rounding, and the layer's output z and post signal y are bf16); float16
autocast with GradScaler 5e-3; float16 autocast (CPU) on a layer whose sum y x passes float16's range
1e-3 (that sum is taken in float32).
"""
import copy

import pytest
import torch
from torch import nn

import hebbloss
from reference import D, rule_update

FP32_TOL, BF16_TOL, FP16_TOL = 1e-4, 2e-2, 5e-3


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1, groups=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 6 * 6, 3))


def _reference_grads(net, x, rule):
    """{parameter name: minus the float64 update} from a float64 copy of ``net`` on ``x`` (post = ReLU)."""
    ref = copy.deepcopy(net).to(D)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, out: seen.__setitem__(m, (a[0], out)))
             for m in ref if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        ref(x.to(D).contiguous())
    for h in hooks:
        h.remove()
    grads = {}
    for (name, layer), (_, ref_layer) in zip(
            [(n, m) for n, m in net.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))],
            [(n, m) for n, m in ref.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))]):
        inp, z = seen[ref_layer]
        dW, db = rule_update(ref_layer, inp, torch.relu(z), z, rule)
        grads[f"{name}.weight"], grads[f"{name}.bias"] = -dW, -db
    return grads


def _relative_errors(net, expected):
    out = {}
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.dtype == p.dtype, name
        ref = expected[name]
        out[name] = ((p.grad.to(D) - ref).abs().max() / ref.abs().max()).item()
    return out


def _batch(device="cpu"):
    return torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("streaming", [False, True])
def test_compiled_hebbian_step_gives_the_rule_update(streaming, rule="softhebb"):
    """torch.compile of a model with attach: forward through the compiled model, loss() and backward.
    The forward hooks run eagerly between the compiled graphs (torch.compiler.disable). One
    rule only: inductor's first compile on CPU takes 15-90 s on 2 loaded cores, the most of this file.
    (A model whose compiled graphs donate their buffers needs streaming=True: see docs/performance.md.)"""
    net, x = _net(), _batch()
    expected = _reference_grads(net, x, rule)
    plastic = hebbloss.attach(net, rule=rule, post="relu", streaming=streaming)
    compiled = torch.compile(net)
    for _ in range(2):  # the second call runs the compiled graphs without recompiling
        net.zero_grad(set_to_none=True)
        compiled(x)
        plastic.loss().backward()
        errors = _relative_errors(net, expected)
        assert max(errors.values()) < FP32_TOL, errors
    plastic.remove()


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("rule", ["oja", "softhebb"])
def test_bf16_autocast_on_cpu_gives_the_fp32_update_within_tolerance(rule, streaming):
    net, x = _net(), _batch()
    expected = _reference_grads(net, x, rule)
    plastic = hebbloss.attach(net, rule=rule, post="relu", streaming=streaming)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        loss = plastic.loss()
    assert out.dtype == torch.bfloat16  # the layers did run in bf16
    assert loss.dtype == torch.float32
    loss.backward()
    errors = _relative_errors(net, expected)
    assert max(errors.values()) < BF16_TOL, errors
    assert max(errors.values()) > 1e-6, "the update was not computed in bf16"


@pytest.mark.parametrize("streaming", [False, True])
def test_channels_last_gives_the_same_update_as_contiguous(streaming):
    net, x = _net(), _batch()
    expected = _reference_grads(net, x, "oja")
    net = net.to(memory_format=torch.channels_last)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    plastic = hebbloss.attach(net, rule="oja", post="relu", streaming=streaming)
    net(x.to(memory_format=torch.channels_last))
    plastic.loss().backward()
    errors = _relative_errors(net, expected)
    assert max(errors.values()) < FP32_TOL, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast with GradScaler needs CUDA")
@pytest.mark.parametrize("streaming", [False, True])
def test_fp16_autocast_with_grad_scaler_on_cuda_gives_the_update_within_tolerance(streaming):
    net, x = _net(), _batch()
    expected = _reference_grads(net, x, "oja")
    net, x = net.cuda(), x.cuda()
    plastic = hebbloss.attach(net, rule="oja", post="relu", streaming=streaming)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        net(x)
        loss = plastic.loss()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # the gradients the step would use
    scaler.step(optimizer)
    scaler.update()
    errors = _relative_errors(net.cpu(), expected)
    assert max(errors.values()) < FP16_TOL, errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_layer_whose_correlation_passes_float16s_range_gives_a_finite_exact_loss(dtype):
    """<y, z> is summed in float32: 4,096 x 64 products of about 9 reach ~2.4e6, past float16's 65,504."""
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(32, 64, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(64, 32, generator=g) * 0.2)
    x = (torch.rand(4096, 32, generator=g) * 1.0).to(dtype)
    plastic = hebbloss.attach(layer, rule="hebb", post="identity")
    z = layer(x)
    loss = plastic.loss()
    reference = -(z.to(D) * z.to(D)).sum()  # y = z: the float64 sum of the same half-precision products
    assert reference.abs() > 65504 and torch.isfinite(loss)
    assert abs(loss.to(D) - reference) / reference.abs() < 1e-4  # float32 accumulation of 262,144 terms
    loss.backward()
    expected = -(z.to(D).T @ x.to(D))  # minus Hebb's update sum y x^T
    assert (layer.weight.grad.to(D) - expected).abs().max() / expected.abs().max() < 1e-2
    direct = hebbloss.surrogate_loss(layer.weight, z.detach().requires_grad_(), z.detach(), "hebb")
    assert torch.isfinite(direct) and abs(direct.to(D) - reference) / reference.abs() < 1e-4


def test_a_compiled_model_with_more_plastic_layers_than_dynamos_recompile_limit_compiles_each_stretch_once():
    """The hooks are not traced: traced, dynamo specialised the hook on each layer's name and compiled it
    again for every layer (then gave up at its recompile limit of 8). Here 12 plastic layers: the model
    compiles into at most one graph per stretch between hooks, none of them holds the hook's sums, and a
    second call compiles nothing."""
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(12)]).to(D)
    plastic = hebbloss.attach(net, rule="oja", post="identity")
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(net, backend=counting_backend)
    x = torch.randn(4, 6, dtype=D)
    compiled(x)
    first = len(graphs)
    net.zero_grad(set_to_none=True)
    plastic.loss().backward()
    compiled(x)
    plastic.loss()
    assert first <= 13 and len(graphs) == first, (first, len(graphs))
    traced_hook = [g for g in graphs if "dot" in g.code or "vector_norm" in g.code]  # the surrogate's sums
    assert not traced_hook, traced_hook[0].code
    plastic.remove()
    torch._dynamo.reset()


@pytest.mark.parametrize("make, shape", [(lambda: nn.Conv2d(2, 3, 3, padding=1), (16, 2, 32, 32)),
                                         (lambda: nn.Linear(8, 4), (16384, 8))])
def test_a_float16_layer_whose_update_passes_float16s_range_gets_the_finite_update(make, shape):
    """Under float16 autocast a large layer's sum y x (here about 1e5 to 1e6) passes float16's 65,504;
    it is taken in float32, as is the bias's sum y, so the gradient is minus the float64 update
    instead of Inf (float16 kernels return the sum in float16)."""
    g = torch.Generator().manual_seed(4)
    layer = make()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 0.5)
        layer.bias.copy_(torch.rand(layer.bias.shape, generator=g))
    x = torch.rand(shape, generator=g) * 2 + 1
    plastic = hebbloss.attach(layer, rule="hebb", post="identity")
    with torch.autocast("cpu", dtype=torch.float16):
        z = layer(x)
        loss = plastic.loss()
    assert z.dtype == torch.float16  # the layer did run in float16
    loss.backward()
    y = z.detach().to(D)  # the layer's own float16 output, as the post signal
    channel = 1 if y.dim() == 4 else -1
    moved = y.movedim(channel, -1).reshape(-1, y.shape[channel])
    if y.dim() == 4:
        patches = torch.nn.functional.unfold(x.to(D), 3, padding=1).transpose(1, 2).reshape(moved.shape[0], -1)
    else:
        patches = x.to(D)
    expected_w = -(moved.T @ patches).reshape(layer.weight.shape)
    expected_b = -moved.sum(0)
    assert expected_w.abs().max() > 65504
    for got, expected in ((layer.weight.grad, expected_w), (layer.bias.grad, expected_b)):
        assert torch.isfinite(got).all()
        assert (got.to(D) - expected).abs().max() / expected.abs().max() < 1e-3


@pytest.mark.parametrize("streaming", [False, True])
def test_bf16_depthwise_channels_last_layer_gets_its_update_in_float32(monkeypatch, streaming):
    """A depthwise convolution on a channels-last input under bfloat16 autocast on the CPU (timm's
    ConvNeXt blocks): its product sum y x is taken in float32 from the layer's bf16 y and its input, and Oja's
    S_c, the bias's sum y and the loss's <y, z> are summed in float32 chunks (made small here, so that
    every sum has several). Weight and bias gradients and the loss then equal the float64 sums of the
    same bf16 values to float32 rounding, where a bf16 product would be off by up to 2e-3."""
    monkeypatch.setattr(hebbloss.rules, "DENSITY_CHUNK_BYTES", 1)
    monkeypatch.setattr(hebbloss.surrogate, "DOT_CHUNK", 50)
    g = torch.Generator().manual_seed(5)
    layer = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    x = torch.randn(5, 4, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    plastic = hebbloss.attach(layer, rule="oja", post="relu", streaming=streaming)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
        loss = plastic.loss()
    assert z.dtype == torch.bfloat16
    loss.backward()
    z64, x64 = z.detach().to(D), x.to(D)  # the layer's bf16 output; the product takes the input as the layer got it
    y = z64.clamp_min(0)
    S = (y * y).sum(dim=(0, 2, 3))
    patches = torch.nn.functional.unfold(x64, 3, padding=1).reshape(5, 4, 9, 81)  # [N, C, kernel, P]
    product = torch.einsum("ncp,nckp->ck", y.flatten(2), patches).reshape(4, 1, 3, 3)
    w, b = layer.weight.detach().to(D), layer.bias.detach().to(D)
    expected_w = -(product - S.view(4, 1, 1, 1) * w)
    expected_b = -(y.sum(dim=(0, 2, 3)) - S * b)
    torch.testing.assert_close(layer.weight.grad.to(D), expected_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad.to(D), expected_b, rtol=1e-5, atol=1e-5)
    expected_loss = -(y * z64).sum() + 0.5 * (S * ((w * w).sum(dim=(1, 2, 3)) + b * b)).sum()
    torch.testing.assert_close(loss.to(D), expected_loss, rtol=1e-5, atol=1e-4)
