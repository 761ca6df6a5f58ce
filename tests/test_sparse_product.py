"""The Hebbian product of a sparse post signal, gathered at its nonzeros (hebbloss.layers.sparse), and
when attach takes it (hebbloss._local.takes_sparse_product). Miconi 2021's k-WTA plasticity.

Every product is compared in float64 with tests/reference.py (decay S = 0 gives sum y x alone).
"""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import hebbloss
import hebbloss._local
from hebbloss.layers import sparse
from reference import D, channel_dim_of, layer_update, rule_update

TOL = dict(rtol=1e-10, atol=1e-10)


def kwta(z, k=1, channel_dim=1, binary=True):
    """k winners of z along the channels: 1 (binary) or z there, 0 elsewhere (written here, not hebbloss's)."""
    index = z.topk(k, dim=channel_dim).indices
    values = torch.ones_like(z) if binary else z
    return torch.zeros_like(z).scatter(channel_dim, index, values.gather(channel_dim, index))


@pytest.fixture
def gathered(monkeypatch):
    """The units of every product taken by the gather (sparse._accumulate calls), in order."""
    calls = []
    original = sparse._accumulate
    monkeypatch.setattr(sparse, "_accumulate", lambda out, rows, post: (calls.append(out.shape[0]), original(out, rows, post)))
    return calls


def _hebbian(layer, x, y):
    """sum y x (and sum y) of the reference: the rule's update with S = 0."""
    units = layer.weight.shape[0]
    return layer_update(layer, x, y, torch.zeros(units, dtype=D))


CONVS = [
    lambda: nn.Conv1d(3, 5, 3, stride=2, dilation=2, padding=1),
    lambda: nn.Conv2d(3, 6, 3),
    lambda: nn.Conv2d(3, 6, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 1)),
    lambda: nn.Conv2d(3, 6, 3, padding="same", dilation=2),
    lambda: nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(3, 6, 3, padding=2, padding_mode="circular", stride=2),
    lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1),
]


@pytest.mark.parametrize("make", CONVS)
@pytest.mark.parametrize("k, binary", [(1, True), (2, False)])
def test_the_sparse_convolution_product_is_sum_y_x(make, k, binary):
    conv = make().to(D)
    x = torch.randn(3, conv.in_channels, *([9] * (conv.weight.dim() - 2)), dtype=D)
    y = kwta(conv(x).detach(), k, binary=binary)
    adjoint = hebbloss.layers.layer_type_of(conv).adjoint(conv, x, conv(x))
    got = adjoint.sparse_weight_grad(y, x, conv.weight)
    torch.testing.assert_close(got, _hebbian(conv, x, y)[0], **TOL)


def test_an_unbatched_channels_last_and_an_all_zero_post_give_sum_y_x():
    conv = nn.Conv2d(4, 8, 3, padding=1).to(D)
    x = torch.randn(2, 4, 7, 7, dtype=D).to(memory_format=torch.channels_last)
    z = conv(x).detach()
    adjoint = hebbloss.layers.layer_type_of(conv).adjoint(conv, x, z)
    for y in (kwta(z), torch.zeros_like(z)):
        torch.testing.assert_close(adjoint.sparse_weight_grad(y, x, conv.weight), _hebbian(conv, x, y)[0], **TOL)
    y0 = kwta(z[0], channel_dim=0)
    torch.testing.assert_close(adjoint.sparse_weight_grad(y0, x[0], conv.weight),
                               _hebbian(conv, x[:1], y0[None])[0], **TOL)


def test_the_patches_are_copied_in_chunks_and_summed_whole():
    conv = nn.Conv2d(3, 6, 3).to(D)
    x = torch.randn(5, 3, 8, 8, dtype=D)
    y = kwta(conv(x).detach(), 2, binary=False)
    got = sparse.conv_sparse_weight_grad(y, x, (3, 3), (1, 1), (1, 1), chunk_bytes=1)  # one sample a chunk
    torch.testing.assert_close(got, _hebbian(conv, x, y)[0], **TOL)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(3, 40, 3), (2, 3, 4, 4)),  # 2 x 2 x 2 positions for 40 units
    (lambda: nn.Conv2d(3, 40, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 1)), (3, 3, 3, 2)),
    (lambda: nn.Conv1d(2, 30, 3, padding=1, padding_mode="reflect"), (4, 2, 3)),
])
@pytest.mark.parametrize("chunk_bytes", [1, sparse.PATCH_CHUNK_BYTES])
def test_fewer_patches_than_units_give_sum_y_x(make, shape, chunk_bytes):
    """Fewer output positions than units (Miconi's layer 3 at batch 10): the patches' columns are put
    in the weight's order before the gather; the product is still the reference's."""
    conv = make().to(D)
    x = torch.randn(shape, dtype=D)
    z = conv(x).detach()
    assert z.numel() // z.shape[1] < z.shape[1]
    y = kwta(z, 2, binary=False)
    geom = hebbloss.layers.layer_type_of(conv).adjoint(conv, x, z).geom
    x_padded = hebbloss.layers.conv._zero_or_explicit_pad(x, geom)
    got = sparse.conv_sparse_weight_grad(y, x_padded, conv.kernel_size, conv.stride, conv.dilation, chunk_bytes)
    torch.testing.assert_close(got, _hebbian(conv, x, y)[0], **TOL)


@pytest.mark.parametrize("shape, k", [((6, 10), 1), ((2, 3, 10), 3)])
def test_the_sparse_linear_product_is_sum_y_x(shape, k):
    fc = nn.Linear(7, shape[-1]).to(D)
    x = torch.randn(*shape[:-1], 7, dtype=D)
    y = kwta(fc(x).detach(), k, channel_dim=-1, binary=False)
    got = hebbloss.layers.layer_type_of(fc).adjoint(fc, x, fc(x)).sparse_weight_grad(y, x, fc.weight)
    torch.testing.assert_close(got, _hebbian(fc, x, y)[0], **TOL)


def test_grouped_and_transposed_convolutions_have_no_sparse_product():
    for layer, x in ((nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5)),
                     (nn.ConvTranspose2d(4, 4, 3), torch.randn(1, 4, 5, 5))):
        adjoint = hebbloss.layers.layer_type_of(layer).adjoint(layer, x, layer(x))
        assert adjoint.sparse_weight_grad is None
        assert not hebbloss._local.takes_sparse_product(adjoint, kwta(layer(x).detach()), layer.weight)


def test_the_gather_is_taken_where_it_saves_work_and_only_on_the_cpu():
    """Miconi 2021's layers 2 and 3 with his binarised k-WTA: gathered; his layer 1 (100 x 75) and a
    dense post on the same layers: the dense kernel; a meta tensor: never."""
    take = hebbloss._local.takes_sparse_product
    for c_in, c_out, size, expected in ((100, 196, 14, True), (196, 400, 6, True), (3, 100, 32, False)):
        conv = nn.Conv2d(c_in, c_out, 3 if c_in > 3 else 5)
        x = torch.randn(4, c_in, size, size)
        z = conv(x).detach()
        adjoint = hebbloss.layers.layer_type_of(conv).adjoint(conv, x, z)
        assert take(adjoint, kwta(z), conv.weight) is expected, (c_in, c_out)
        assert not take(adjoint, torch.relu(z), conv.weight)
        assert not take(adjoint, kwta(z).to("meta"), conv.weight)


def _miconi_like():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, bias=False), nn.Flatten(), nn.Linear(16 * 25, 12))
    prune.random_unstructured(model[1], "weight", amount=0.5)
    return model.to(D)


@pytest.mark.parametrize("rule", ["hebb", "instar", "oja", "softhebb"])
@pytest.mark.parametrize("streaming", [False, True])
def test_attach_takes_a_sparse_posts_update_from_its_nonzeros_and_it_is_the_rules(monkeypatch, gathered, rule, streaming):
    """With the gate opened to every layer (SPARSE_GAIN = 0), each layer's gradient is minus the rule's
    float64 update (a pruned weight's through its mask), and every product was gathered."""
    monkeypatch.setattr(hebbloss._local, "SPARSE_GAIN", 0)
    model = _miconi_like()
    seen = {}
    for name in ("0", "1", "3"):
        model.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, (a[0].detach().clone(), out.detach().clone())))
    posts = {"0": lambda z: kwta(z), "1": lambda z: kwta(z, 2, binary=False), "3": lambda z: kwta(z, 1, -1, False)}
    plastic = hebbloss.attach(model, rule=rule, targets=["0", "1", "3"],
                              overrides={n: {"post": p} for n, p in posts.items()}, streaming=streaming)
    model(torch.randn(4, 3, 7, 7, dtype=D))
    plastic.loss().backward()
    assert gathered == [8, 16, 12]
    for name in ("0", "1", "3"):
        layer = model.get_submodule(name)
        x, z = seen[name]
        update = rule_update(layer, x, posts[name](z), z, rule)
        if name == "1":  # pruned: the update of the kept connections, on weight_orig
            torch.testing.assert_close(layer.weight_orig.grad, -update[0] * layer.weight_mask, **TOL)
        else:
            torch.testing.assert_close(layer.weight.grad, -update[0], **TOL)
            torch.testing.assert_close(layer.bias.grad, -update[1], **TOL)


def test_under_bfloat16_autocast_the_gathered_product_is_summed_in_float32(monkeypatch):
    """The layer computes z in bfloat16; the binary y is exact, and the gathered sum of the float32
    input it was given is float32's (the dense kernel would round the input to bfloat16 first)."""
    monkeypatch.setattr(hebbloss._local, "SPARSE_GAIN", 0)
    conv = nn.Conv2d(3, 16, 3)
    plastic = hebbloss.attach(conv, rule="instar", post=kwta)
    x = torch.randn(8, 3, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = conv(x)
        loss = plastic.loss()
    loss.backward()
    assert z.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32
    update = rule_update(conv, x.double(), kwta(z.detach()).double(), z.detach().double(), "instar")
    torch.testing.assert_close(conv.weight.grad.double(), -update[0], rtol=0, atol=1e-5 * update[0].abs().max().item())


def test_miconis_network_gets_the_same_update_by_gather_as_by_the_dense_kernel(monkeypatch, gathered):
    """His layers 2 and 3 take the gather at the default gate, float32: equal to the dense path's
    gradients up to float32 rounding, both within float32 tolerance of each other."""
    def gradients(gain):
        monkeypatch.setattr(hebbloss._local, "SPARSE_GAIN", gain)
        torch.manual_seed(0)
        model = hebbloss.models.create("miconi2021")
        plastic = model.recipe.attach(model)
        model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        plastic.loss().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    default = gradients(hebbloss._local.SPARSE_GAIN)
    assert sorted(set(gathered)) == [196, 400]
    dense = gradients(float("inf"))
    for name in dense:
        torch.testing.assert_close(default[name], dense[name], rtol=1e-5, atol=1e-5 * dense[name].abs().max().item())
