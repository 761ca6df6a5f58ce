"""Amit 2019's networks and stabilisers (github.com/yaliamit/URFB@008757f), against plain float64
references: the clipped ramp, backward clipping, his max pooling, weight clipping at 1.5 x Glorot."""
import math

import pytest
import torch
from torch import nn

from hebbloss import feedback as fb, models
from hebbloss.feedback import stabilisers as st
from hebbloss.models.amit2019 import AmitMaxPool, RampLayer

pytestmark = pytest.mark.usefixtures("float64_default")


def test_clipped_ramp_forward_and_backward_match_his_formula():
    z = torch.tensor([-5.0, -2.0, -1.99, -0.3, 0.0, 0.7, 1.999, 2.0, 3.0], requires_grad=True)
    out = st.ClippedRamp(0.5)(z)
    g = torch.arange(1.0, 10.0)
    out.backward(g)
    for i, zi in enumerate(z.tolist()):
        ref = min(max(0.5 * zi, -1.0), 1.0)
        assert out[i].item() == ref
        # his backward: scale * g where the output is not +/-1, else 0 (also at z = +/-2 exactly)
        assert z.grad[i].item() == (0.0 if abs(ref) == 1.0 else 0.5 * g[i].item())


def test_backward_clip_is_identity_forward_and_clips_the_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(3, 4) * 4
    y = st.BackwardClip(0.5)(x)
    assert torch.equal(y, x)
    y.backward(g)
    for a, b in zip(x.grad.flatten().tolist(), g.flatten().tolist()):
        assert a == min(max(0.5 * b, -1.0), 1.0)
    x.grad = None
    st.BackwardClip(0.0)(x).backward(g)  # 0: off
    assert torch.equal(x.grad, g)


def test_ramp_layer_input_gradient_under_fa_matches_a_plain_reference():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4, bias=False)
    layer = RampLayer(lin, 0.5, 0.5)
    with torch.no_grad():
        lin.weight.mul_(6)  # some units saturate
    handle = fb.convert(layer, "fa", generator=torch.Generator().manual_seed(0))
    B = handle.feedback_weight("layer")
    x = torch.randn(7, 5, requires_grad=True)
    g = torch.randn(7, 4) * 3
    layer(x).backward(g)
    z = x.detach() @ lin.weight.detach().T
    ref = torch.zeros(7, 5)
    for n in range(7):
        delta = [0.0 if abs(min(max(0.5 * z[n, o].item(), -1), 1)) == 1 else 0.5 * g[n, o].item() for o in range(4)]
        for i in range(5):
            s = sum(delta[o] * B[o, i].item() for o in range(4))
            ref[n, i] = min(max(0.5 * s, -1.0), 1.0)
    torch.testing.assert_close(x.grad, ref)
    handle.remove()


@pytest.mark.parametrize("size,stride,n", [(3, 2, 8), (3, 2, 7), (3, 3, 32), (3, 3, 31), (2, 2, 11)])
def test_max_pool_as_his_code(size, stride, n):
    x = torch.randn(2, 3, n, n) - 0.5
    out = AmitMaxPool(size, stride)(x)
    m = -(-n // stride)
    assert out.shape == (2, 3, m, m)
    total = max((m - 1) * stride + size - n, 0)
    before = total // 2 if size == stride else 0
    for i in range(m):
        for j in range(m):
            vals = []
            for a in range(size):
                for b in range(size):
                    r, c = i * stride + a - before, j * stride + b - before
                    if 0 <= r < n and 0 <= c < n:
                        vals.append(x[..., r, c])
                    elif size != stride:  # MaxPoolingandMask pads with zeros
                        vals.append(torch.zeros(2, 3))
            torch.testing.assert_close(out[..., i, j], torch.stack(vals).amax(0))


@pytest.mark.parametrize("net,dense_in", [("simple", 32 * 11 * 11), ("deep", 128 * 4 * 4), ("deep_s", 64 * 3 * 3)])
def test_networks_at_32x32_tied_and_untied(net, dense_in):
    tied = models.create("amit2019", net=net, seed=0)
    untied = models.create("amit2019", net=net, untied=True, seed=0)
    assert tied.dense.layer.in_features == dense_in and tied.final.out_features == 10
    assert all(getattr(m, "bias", None) is None for m in tied.modules())
    convs = [n for n, m in tied.named_modules() if isinstance(m, nn.Conv2d)]
    # his deepernet_s.txt@17b91d1 lists every conv but the first under ``sparse:``; the others list none
    kept = {"conv0.first.layer"} if net == "deep_s" else set()
    assert convs and {n for n in convs if isinstance(untied.get_submodule(n), nn.Conv2d)} == kept
    assert all(isinstance(untied.get_submodule(n), fb.LocallyConnected2d) for n in convs if n not in kept)
    assert untied.settings.sparse_batch_size == (50 if net == "deep_s" else None)
    x = torch.randn(2, 3, 32, 32)
    tied.eval(), untied.eval()
    torch.testing.assert_close(untied(x), tied(x))  # untied starts as the tied net
    assert tied(x).shape == (2, 10)
    for name in tied.weight_layers:  # Glorot uniform start
        w = tied.get_submodule(name).weight
        assert w.abs().max() <= st.glorot_bound(tied.get_submodule(name))
    assert isinstance(tied.loss(), fb.AmitHingeLoss) and tied.loss().mu == 1.0


def test_glorot_bound_and_weight_clipping_after_step():
    conv = nn.Conv2d(16, 32, 3)
    assert st.glorot_bound(conv) == pytest.approx(math.sqrt(6 / (9 * (16 + 32))), rel=1e-15)
    assert st.glorot_bound(nn.Linear(3872, 500)) == pytest.approx(math.sqrt(6 / (3872 + 500)), rel=1e-15)
    lc = fb.LocallyConnected2d.from_conv(conv, 6)
    assert st.glorot_bound(lc) == st.glorot_bound(conv)

    model = models.create("amit2019", net="simple", seed=0)
    handle = fb.convert(model, "urfb", init=model.glorot_init)
    opt = torch.optim.SGD(model.parameters(), lr=100.0)
    model.clip_weights_after_step(opt)
    model.loss()(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    for name in model.weight_layers:
        m = model.get_submodule(name)
        bound = 1.5 * math.sqrt(6 / (m.weight[0].numel() // m.weight.shape[1] * (m.weight.shape[0] + m.weight.shape[1])))
        for t in (m.weight, m.feedback_weight):
            assert t.abs().max().item() == pytest.approx(bound, rel=1e-12)  # lr 100 pushes some to the bound
    handle.remove()
    with pytest.raises(ValueError, match="has no weight"):
        st.clip_weights_after_step(opt, [nn.ReLU()])


def test_amit2019_bad_net_name():
    with pytest.raises(ValueError, match="choose one of 'simple', 'deep', 'deep_s'"):
        models.create("amit2019", net="resnet")
