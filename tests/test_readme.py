"""The README's quick start runs as written, and really trains: the weights move by the rule."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_runs_and_changes_the_weights():
    import timm

    torch.manual_seed(0)
    untrained = timm.create_model("resnet18", pretrained=False, num_classes=0)
    torch.manual_seed(0)
    namespace = {}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)
    model, plastic = namespace["model"], namespace["plastic"]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in plastic.layers.values())
    for (name, trained), (_, fresh) in zip(model.named_parameters(), untrained.named_parameters()):
        assert torch.isfinite(trained).all(), name
    assert not torch.equal(model.conv1.weight, untrained.conv1.weight)
    assert torch.equal(model.bn1.weight, untrained.bn1.weight)  # not plastic: untouched
