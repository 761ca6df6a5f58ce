"""Converted timm models train: the loss falls on a fixed batch (small inputs keep this fast)."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from hebbloss import feedback as fb

MODELS = {
    "resnet18": (dict(), "fa", False),
    "efficientnet_b0": (dict(), "usf", False),
    "vit_tiny_patch16_224": (dict(img_size=32, patch_size=8), "kp", False),
    "resnet18-autocast": (dict(), "urfb", True),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_converted_timm_model_trains(case):
    kwargs, mode, autocast = MODELS[case]
    torch.manual_seed(0)
    model = timm.create_model(case.split("-")[0], pretrained=False, num_classes=4, **kwargs)
    keys = list(model.state_dict())
    handle = fb.convert(model, mode)
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    assert len(handle.layers) == n_layers
    assert set(keys) <= set(model.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{case} under {mode}: losses {losses}"
    if mode in ("urfb", "kp"):
        assert all(b.grad is not None for b in handle.feedback_parameters())
    handle.remove()
    assert list(model.state_dict()) == keys
