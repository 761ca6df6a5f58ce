"""Post-synaptic signals (k-WTA with homeostasis, soft-WTA) and the Triangle nonlinearity,
checked against plain float64 references written here (Miconi 2021; Journe et al. 2023)."""
import copy

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import hebbloss
from hebbloss.competition import KWTA, SoftWTA, Triangle

D = torch.float64


def kwta_reference(z, k, theta):
    """Loop over (sample, position): the k channels with largest z - theta get 1."""
    b, c = z.shape[:2]
    flat = (z - theta.view(1, -1, *([1] * (z.dim() - 2)))).movedim(1, -1).reshape(-1, c)
    out = torch.zeros_like(flat)
    for row in range(flat.shape[0]):
        order = sorted(range(c), key=lambda j: -float(flat[row, j]))
        for j in order[:k]:
            out[row, j] = 1.0
    return out.reshape(*z.movedim(1, -1).shape).movedim(-1, 1)


@given(k=st.integers(1, 5), c=st.integers(5, 9), binary=st.booleans(), seed=st.integers(0, 2**16))
def test_kwta_matches_reference(k, c, binary, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, c, 3, 2, generator=g, dtype=D)
    theta = torch.randn(c, generator=g, dtype=D)
    post = KWTA(k, binary=binary, num_channels=c).double()
    post.theta.copy_(theta)
    mask = kwta_reference(z, k, theta)
    expected = mask if binary else z * mask
    assert torch.equal(post(z), expected)
    assert torch.equal(post.theta, theta)  # homeostasis=0: thresholds never move


def test_kwta_linear_channel_dim_last():
    z = torch.randn(4, 7, dtype=D)
    out = KWTA(2, binary=True, channel_dim=-1)(z)
    assert torch.equal(out.sum(dim=-1), torch.full((4,), 2.0, dtype=D))
    top = z.argsort(dim=-1, descending=True)[:, :2]
    assert torch.equal(out.gather(-1, top), torch.ones(4, 2, dtype=D))


def test_homeostasis_drives_win_rates_to_k_over_c():
    c, k, mu = 8, 2, 0.05
    bias = torch.linspace(-3, 3, c).view(1, c, 1, 1)  # without homeostasis channel 7 would always win
    post = KWTA(k, binary=True, homeostasis=mu, num_channels=c).train()
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        post(torch.randn(16, c, 4, 4, generator=g) + bias)
    post.eval()
    theta = post.theta.clone()
    wins = torch.zeros(c)
    for _ in range(50):
        wins += post(torch.randn(16, c, 4, 4, generator=g) + bias).sum(dim=(0, 2, 3))
    rate = wins / (50 * 16 * 16)
    assert torch.equal(post.theta, theta), "eval mode must not adapt the thresholds"
    assert torch.allclose(rate, torch.full((c,), k / c), atol=0.03), rate


@pytest.mark.parametrize("k, shape, channel_dim", [(1, (3, 5, 2, 2), 1), (3, (3, 5, 2, 2), 1), (2, (4, 6), -1),
                                                   (2, (5,), 0)])
def test_homeostasis_update_is_the_formula(k, shape, channel_dim):
    """theta_c += mu * (win rate of c - k/C), the win rate the mean of the reference mask over every
    (sample, position), from thresholds that are not zero; twice, so the second call uses the first's."""
    mu = 0.3
    c = shape[channel_dim]
    post = KWTA(k, homeostasis=mu, num_channels=c, channel_dim=channel_dim).double().train()
    theta = torch.randn(c, dtype=D) * 0.1
    post.theta.copy_(theta)
    g = torch.Generator().manual_seed(k)
    for _ in range(2):
        z = torch.randn(shape, dtype=D, generator=g)
        channels_second = z.movedim(channel_dim, 0).unsqueeze(0) if z.dim() == 1 else z.movedim(channel_dim, 1)
        mask = kwta_reference(channels_second, k, theta)
        theta = theta + mu * (mask.transpose(0, 1).reshape(c, -1).mean(dim=1) - k / c)
        post(z)
        torch.testing.assert_close(post.theta, theta)


def test_kwta_through_attach_binds_and_saves_thresholds():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1))
    plastic = hebbloss.attach(model, rule="instar", post=KWTA(2, binary=True, homeostasis=0.1))
    model(torch.randn(2, 3, 5, 5))
    plastic.loss()
    state = plastic.state_dict()
    assert state["posts.0.theta"].shape == (6,) and state["posts.2.theta"].shape == (4,)
    assert state["posts.0.theta"].abs().sum() > 0
    model.eval()
    before = copy.deepcopy(plastic.state_dict())
    model(torch.randn(2, 3, 5, 5))
    plastic.loss()
    assert all(torch.equal(before[k], v) for k, v in plastic.state_dict().items()), "eval forward moved thresholds"
    other = hebbloss.attach(copy.deepcopy(model), rule="instar", post=KWTA(2, binary=True, homeostasis=0.1))
    other.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    plastic.remove()


def test_kwta_bad_hyperparameters():
    with pytest.raises(ValueError, match="k=7 winners but the layer has only 6 channels"):
        hebbloss.attach(nn.Conv2d(3, 6, 3), post=KWTA(7))
    with pytest.raises(ValueError, match="positive integer"):
        KWTA(0)
    with pytest.raises(ValueError, match="homeostasis"):
        KWTA(1, homeostasis=-1.0)
    with pytest.raises(ValueError, match="channel_dim"):
        KWTA(1, channel_dim=1)(torch.randn(5))


def softwta_reference(u, beta, anti):
    """Per (sample, position): softmax by hand; losers negated when anti-Hebbian."""
    c = u.shape[1]
    flat = u.movedim(1, -1).reshape(-1, c)
    out = torch.empty_like(flat)
    for row in range(flat.shape[0]):
        e = [float(torch.exp(beta * (flat[row, j] - flat[row].max()))) for j in range(c)]
        total = sum(e)
        win = max(range(c), key=lambda j: float(flat[row, j]))
        for j in range(c):
            out[row, j] = e[j] / total * (1 if (j == win or not anti) else -1)
    return out.reshape(*u.movedim(1, -1).shape).movedim(-1, 1)


@given(beta=st.floats(0.05, 5.0), anti=st.booleans(), c=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_softwta_matches_reference(beta, anti, c, seed):
    u = torch.randn(2, c, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=D)
    assert torch.allclose(SoftWTA(beta, anti_hebbian=anti)(u), softwta_reference(u, beta, anti), atol=1e-12)


@pytest.mark.parametrize("anti", [True, False])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_softwta_sets_subnormal_values_to_zero_and_keeps_the_rest(anti, requires_grad):
    """exp(-100) = 3.7e-44 is subnormal in float32: set to 0 (products with subnormals are slow on many
    CPUs); every other value is the float64 reference's, rounded to float32."""
    u = torch.tensor([[[0.0]], [[-100.0]], [[-20.0]], [[-1.0]]]).movedim(0, 1)  # [1, 4 channels, 1, 1]
    u.requires_grad_(requires_grad)
    y = SoftWTA(1.0, anti_hebbian=anti)(u)
    expected = softwta_reference(u.detach().to(D), 1.0, anti)
    assert expected[0, 1].abs() < torch.finfo(torch.float32).tiny and y[0, 1].item() == 0.0
    assert torch.isfinite(y).all() and not ((y != 0) & (y.abs() < torch.finfo(torch.float32).tiny)).any()
    keep = torch.tensor([True, False, True, True])
    torch.testing.assert_close(y.detach()[0, keep].to(D), expected[0, keep], rtol=2e-7, atol=0)
    if requires_grad:  # the subnormals' removal does not break the softmax's backward
        y.sum().backward()
        assert torch.isfinite(u.grad).all()


@given(beta=st.floats(0.5, 3.0), anti=st.booleans(), seed=st.integers(0, 2**16))
def test_softwta_over_a_wide_spread_matches_the_float64_reference(beta, anti, seed):
    """u spread over hundreds (as in the SoftHebb network's first layer), so that many softmax values
    fall below float32's smallest normal: those are 0, every other value is the float64 reference's."""
    u64 = torch.randn(2, 7, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=D) * 60
    y = SoftWTA(beta, anti_hebbian=anti)(u64.float()).to(D)
    expected = softwta_reference(u64.float().to(D), beta, anti)
    small = expected.abs() < torch.finfo(torch.float32).tiny
    assert small.any(), "the spread must reach below float32's smallest normal"
    assert (y[small] == 0).all()
    # float32's rounding of beta * u (up to hundreds) moves exp(beta * (u - max u)) by a relative error
    # of about eps x (|beta u| + |beta max u|)
    u32 = u64.float().to(D)
    magnitude = beta * (u32.abs() + u32.amax(dim=1, keepdim=True).abs())
    bound = expected.abs() * 4 * torch.finfo(torch.float32).eps * (1 + magnitude)
    assert ((y - expected).abs() <= bound)[~small].all()
    # and bit for bit torch.softmax's own float32 values, where they are normal numbers
    plain = torch.softmax(u64.float() * beta, dim=1)
    plain = torch.where(plain < torch.finfo(torch.float32).tiny, 0.0, plain).to(D)
    assert torch.equal(y.abs(), plain)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_softwta_winner_is_the_first_of_equal_values_and_its_gradient_is_the_reference(requires_grad):
    """Ties (whole-number u) go to the first channel, as in the reference; where u requires grad,
    the gradient is that of the plain float64 expression softmax * (+1 winner, -1 others)."""
    u = torch.randint(-2, 3, (3, 5, 4, 4), generator=torch.Generator().manual_seed(0)).to(D)
    u.requires_grad_(requires_grad)
    y = SoftWTA(0.7)(u)
    torch.testing.assert_close(y.detach(), softwta_reference(u.detach(), 0.7, True), rtol=0, atol=1e-12)
    if requires_grad:
        weights = torch.randn(u.shape, generator=torch.Generator().manual_seed(1), dtype=D)
        (grad,) = torch.autograd.grad((y * weights).sum(), u)
        v = u.detach().clone().requires_grad_(True)
        sign = torch.full_like(v, -1.0).scatter_(1, v.detach().argmax(dim=1, keepdim=True), 1.0)
        (expected,) = torch.autograd.grad((torch.softmax(0.7 * v, dim=1) * sign * weights).sum(), v)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [-1.0, 0.0, float("nan"), float("inf")])
def test_softwta_rejects_bad_temperature(beta):
    with pytest.raises(ValueError, match="inverse_temperature"):
        SoftWTA(beta)


@given(power=st.sampled_from([0.7, 1.0, 1.4]), seed=st.integers(0, 2**16))
def test_triangle_matches_reference(power, seed):
    u = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=D)
    expected = torch.empty_like(u)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                m = sum(float(u[b, c, i, j]) for c in range(5)) / 5
                for c in range(5):
                    expected[b, c, i, j] = max(float(u[b, c, i, j]) - m, 0.0) ** power
    assert torch.allclose(Triangle(power)(u), expected, atol=1e-12)


def test_triangle_rejects_bad_power():
    with pytest.raises(ValueError, match="power"):
        Triangle(0)


def test_forward_and_plastic_signals_are_independent():
    """Dense Triangle forward, sparse binarised k-WTA plasticity on the same layer (Miconi 2021)."""
    model = nn.Sequential(nn.Conv2d(2, 6, 3, bias=False), Triangle())
    plastic = hebbloss.attach(model, rule="hebb", targets="0", post=KWTA(1, binary=True))
    x = torch.randn(1, 2, 4, 4, dtype=torch.float32)
    out = model(x)
    record = plastic.records["0"][0]
    assert (out > 0).float().sum(dim=1).max() > 1            # several channels active forward
    assert torch.equal(record.post.sum(dim=1), torch.ones(1, 2, 2))  # exactly one plastic winner
    plastic.loss().backward()
    z = record.output.detach()
    patches = torch.nn.functional.unfold(x, 3)              # [1, 18, 4]
    y = record.post.reshape(1, 6, 4)
    expected = -(y @ patches.transpose(1, 2))[0].reshape(6, 2, 3, 3)
    assert torch.allclose(model[0].weight.grad, expected, atol=1e-5)
    assert z.shape == record.post.shape
    plastic.remove()
