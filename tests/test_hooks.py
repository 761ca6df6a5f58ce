"""The hook-owning handles (attach's Plasticity, feedback.convert's Feedback, the probe's feature capture):
remove() restores the model's hook dictionaries exactly and may be called twice, `with` removes on exit
(also on an exception), and a deep copy of a model with live hebbloss hooks runs as the plain model while
the user's handle keeps working. The tests read the private hook dictionaries; the library does not."""
import copy

import pytest
import torch
from torch import nn

import hebbloss
from hebbloss import feedback as fb
from hebbloss.probe import capture_features
from hebbloss.probe.baselines import random_copy

D = torch.float64
_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks",
)


def _hooks(model):
    """Every hook dictionary of every module: its keys and the hook objects, in order."""
    return {(n, d): list(getattr(m, d, {}).items()) for n, m in model.named_modules() for d in _HOOK_DICTS}


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(D)
    net[0].register_forward_hook(lambda m, a, o: None)  # the user's own hooks stay, in their place
    net.register_forward_pre_hook(lambda m, a: None)
    return net


def _make(kind, model):
    if kind == "attach":
        return hebbloss.attach(model, rule="oja")
    return fb.convert(model, "urfb")  # adds a feedback_weight Parameter to each layer


@pytest.mark.parametrize("kind", ["attach", "convert"])
def test_remove_twice_restores_hooks_and_state_dict_exactly(kind):
    model = _net()
    hooks, keys = _hooks(model), list(model.state_dict())
    handle = _make(kind, model)
    assert _hooks(model) != hooks
    model(torch.randn(3, 5, dtype=D))
    handle.remove()
    assert _hooks(model) == hooks and list(model.state_dict()) == keys
    handle.remove()
    assert _hooks(model) == hooks and list(model.state_dict()) == keys


@pytest.mark.parametrize("kind", ["attach", "convert"])
def test_a_second_remove_leaves_a_later_handle_alone(kind):
    model = _net()
    first = _make(kind, model)
    first.remove()
    second = _make(kind, model)
    with_second = _hooks(model)
    first.remove()
    assert _hooks(model) == with_second
    with pytest.raises(ValueError, match="already"):  # the layers are still the second handle's
        _make(kind, model)
    second.remove()


@pytest.mark.parametrize("kind", ["attach", "convert"])
def test_with_removes_on_exit_also_on_an_exception(kind):
    model = _net()
    hooks, keys = _hooks(model), list(model.state_dict())
    with _make(kind, model) as handle:
        assert _hooks(model) != hooks
        model(torch.randn(3, 5, dtype=D))
    assert _hooks(model) == hooks and list(model.state_dict()) == keys
    with pytest.raises(ZeroDivisionError):
        with _make(kind, model):
            1 / 0
    assert _hooks(model) == hooks and list(model.state_dict()) == keys
    handle.remove()  # a third time, harmless


def test_capture_features_restores_hooks_also_when_the_forward_fails():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3))
    model[0].register_forward_hook(lambda m, a, o: None)
    images = torch.rand(6, 1, 8, 8)
    hooks = _hooks(model)
    feats = capture_features(model, ["0", "2"], images, pool="flatten")
    assert set(feats) == {"0", "2"} and _hooks(model) == hooks
    model[2].register_forward_pre_hook(lambda m, a: 1 / 0)
    hooks = _hooks(model)
    with pytest.raises(ZeroDivisionError):
        capture_features(model, ["0"], images, pool="flatten")
    assert _hooks(model) == hooks


def _hebb_grad(x, weight):
    """Reference: the Hebbian update sum_n z_n x_n^T of a Linear layer without bias, z = W x (float64)."""
    z = x @ weight.T
    return z.T @ x


def test_a_deep_copy_runs_as_the_plain_model_and_the_original_still_records():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False)).to(D)
    plain = copy.deepcopy(model)
    plastic = hebbloss.attach(model, rule="hebb")
    model(torch.randn(2, 5, dtype=D))  # records waiting for loss(): non-leaf tensors in the handle
    for clone in (copy.deepcopy(model), random_copy(model, seed=0)):
        clone.load_state_dict(plain.state_dict())
        waiting = [len(r) for r in plastic.records.values()]
        x = torch.randn(3, 5, dtype=D, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        clone(x).sum().backward()
        plain(x_ref).sum().backward()
        assert [len(r) for r in plastic.records.values()] == waiting  # nothing recorded into the user's handle
        torch.testing.assert_close(x.grad, x_ref.grad)  # the input was not detached: backprop reaches it
        torch.testing.assert_close(clone[0].weight.grad, plain[0].weight.grad)
        plain.zero_grad()
    plastic.loss()  # the earlier records
    x = torch.randn(3, 5, dtype=D)
    model(x)
    model.zero_grad()
    plastic.loss().backward()
    torch.testing.assert_close(model[0].weight.grad, -_hebb_grad(x, model[0].weight.detach()))
    plastic.remove()


def test_a_deep_copy_of_a_converted_model_runs_plain_backprop():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    plain = copy.deepcopy(model)
    handle = fb.convert(model, "fa")
    clone = copy.deepcopy(model)
    x = torch.randn(3, 5, dtype=D, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    clone(x).sum().backward()
    plain(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    y = x.detach().clone().requires_grad_(True)
    model(y).sum().backward()  # the original still uses B
    assert not torch.allclose(y.grad, x_ref.grad)
    handle.remove()
