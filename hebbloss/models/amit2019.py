"""Amit's CIFAR-10 networks (Amit 2019, "Deep learning with asymmetric connections and Hebbian
updates", Frontiers in Computational Neuroscience), as his code defines them: github.com/yaliamit/URFB
at commit 008757f (January 2019), parameter files _pars/simpnet.txt ("simple") and
_pars/deepernet.txt ("deep"), and _pars/deepernet_s.txt at commit 17b91d1 ("deep_s", the network of
his untied ("sparse") runs: the layers it lists under ``sparse:`` are turned into locally connected
layers after ``num_epochs`` and trained on at ``sparse_batch_size`` 50, a tenth of his batch of 500, at the
same step 0.1; run_conv.py and Conv_net_aux.py ``sparse_process_parameters``), built by Conv_net_gpu.py
``recreate_network``.

- every conv is 'SAME' padded, stride 1, without bias; every dense layer has no bias; weights start
  Glorot uniform (TensorFlow's ``get_variable`` default, Conv_layers.py);
- each layer marked ``non_linearity:tanh`` is followed by the clipped ramp clip(0.5 z, -1, 1)
  (``nonlin_scale:.5``; the name "tanh" is only a flag, README.txt) and its input gradient is clipped
  to clip(bscale g, -1, 1) when ``b_nonlin_scale`` > 0 (:mod:`hebbloss.feedback.stabilisers`);
- ``concatsum`` layers add a conv's output to that of the conv above it (residual pairs);
- max pooling: window = stride uses ``tf.nn.max_pool`` 'SAME' (padding never wins); overlapping
  windows (3, stride 2) use his ``MaxPoolingandMask``: zeros appended after the last row and column,
  ceil(size / stride) outputs;
- dropout ``drop:p`` zeroes with probability p (Conv_layers.py ``real_drop``);
- the last layer is linear and trained with his hinge cost :class:`hebbloss.feedback.AmitHingeLoss`
  (``hinge``, ``off_class_fac:1.``), by plain SGD (batch 500, step 0.1), B updated with W's gradient
  at the same step (URFB, ``force_global_prob:(1.,1.)``), W and B clipped after each step to
  1.5 times the Glorot bound (:func:`hebbloss.feedback.clip_weights_after_step`).

    model = hebbloss.models.create("amit2019", net="deep", untied=False)
    fb = hebbloss.feedback.convert(model, "urfb", init=model.glorot_init)
    optimizer = torch.optim.SGD(model.parameters(), lr=model.settings.step_size)
    model.clip_weights_after_step(optimizer)
    loss = model.loss()(model(x), y)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..feedback import untie
from ..feedback.amit_loss import AmitHingeLoss
from ..feedback.stabilisers import NONLIN_SCALE, WEIGHT_CLIP_FACTOR, BackwardClip, ClippedRamp, clip_weights_after_step

PAPER = "Amit 2019, Deep learning with asymmetric connections and Hebbian updates, Front. Comput. Neurosci."
REPO = "yaliamit/URFB@008757f"


@dataclass(frozen=True)
class Settings:
    """His training constants for one network (the _pars file named in ``source``)."""

    source: str
    batch_size: int = 500
    step_size: float = 0.1
    epochs: int = 100
    off_class_fac: float = 1.0  # mu of AmitHingeLoss
    nonlin_scale: float = NONLIN_SCALE
    b_nonlin_scale: float = 0.0  # backward clipping; 0: off
    weight_clip_factor: float = WEIGHT_CLIP_FACTOR
    # his untied ("sparse") phase: the batch it trains at (``sparse_batch_size``) and the convolutions it
    # unties (``sparse:``, as module names here); None: the file has no sparse phase (every conv is untied)
    sparse_batch_size: Optional[int] = None
    sparse_layers: Optional[Tuple[str, ...]] = None


SETTINGS = {
    "simple": Settings("_pars/simpnet.txt", epochs=100, b_nonlin_scale=0.5),
    "deep": Settings("_pars/deepernet.txt", epochs=200, b_nonlin_scale=0.0),
    # 100 epochs tied; his sparse phase then unties conv0a, conv2, conv2a, conv3, conv3a (conv0 stays a
    # convolution), re-randomises them and the dense layers, freezes conv0 and trains 1000 epochs at batch
    # 50. Here ``untied=True`` unties the same five from the start; conv0 stays a trainable convolution.
    "deep_s": Settings("_pars/deepernet_s.txt@17b91d1", epochs=100, b_nonlin_scale=0.0, sparse_batch_size=50,
                       sparse_layers=("conv0.second.layer", "conv2.first.layer", "conv2.second.layer",
                                      "conv3.first.layer", "conv3.second.layer")),
}


class AmitMaxPool(nn.Module):
    """Max pooling with ceil(size / stride) outputs as in his code (see the module docstring)."""

    def __init__(self, size: int, stride: int):
        super().__init__()
        self.size, self.stride = int(size), int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.size, self.stride
        pads = [max((-(-n // s) - 1) * s + k - n, 0) for n in x.shape[-2:]]  # height, width
        if k == s:  # tf.nn.max_pool 'SAME': split before/after, padded entries never win
            x = F.pad(x, (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2), value=-math.inf)
        else:  # MaxPoolingandMask: zeros after the last column and row
            x = F.pad(x, (0, pads[1], 0, pads[0]))
        return F.max_pool2d(x, k, s)

    def extra_repr(self) -> str:
        return f"size={self.size}, stride={self.stride}"


class RampLayer(nn.Module):
    """BackwardClip -> ('SAME' zero padding) -> conv or dense without bias -> ClippedRamp."""

    def __init__(self, layer: nn.Module, scale: float, bscale: float):
        super().__init__()
        self.back_clip = BackwardClip(bscale)
        self.pad = None
        if isinstance(layer, nn.Conv2d):
            total = [k - 1 for k in layer.kernel_size]  # 'SAME' at stride 1: TF pads (k-1)//2 before
            self.pad = nn.ZeroPad2d((total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        self.layer = layer
        self.ramp = ClippedRamp(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.back_clip(x)
        if self.pad is not None:
            x = self.pad(x)
        return self.ramp(self.layer(x))


class ResidualPair(nn.Module):
    """His ``concatsum``: a = first(x), output a + second(a)."""

    def __init__(self, first: RampLayer, second: RampLayer):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.first(x)
        return a + self.second(a)


class Amit2019Net(nn.Sequential):
    """One of Amit's networks; ``settings`` holds his constants, ``weight_layers`` the names of
    its conv / untied / dense layers."""

    def __init__(self, blocks: "OrderedDict[str, nn.Module]", net: str, settings: Settings):
        super().__init__(blocks)
        self.net, self.settings = net, settings

    @property
    def weight_layers(self) -> List[str]:
        return [n for n, m in self.named_modules() if n.endswith("layer") or n == "final"]

    def loss(self) -> AmitHingeLoss:
        """His hinge cost with his ``off_class_fac``."""
        return AmitHingeLoss(self.settings.off_class_fac)

    def clip_weights_after_step(self, optimizer: torch.optim.Optimizer, factor: Optional[float] = None):
        """Clip W (and B) of every weight layer after each step to ``factor`` (1.5) * Glorot bound."""
        factor = self.settings.weight_clip_factor if factor is None else factor
        return clip_weights_after_step(optimizer, [self.get_submodule(n) for n in self.weight_layers], factor)

    @staticmethod
    def glorot_init(weight: torch.Tensor) -> torch.Tensor:
        """A fresh Glorot uniform tensor of ``weight``'s shape (his initial R), for ``convert(init=...)``;
        an untied weight [oh, ow, out, in, kh, kw] gets the fans of one position's filter bank."""
        w = torch.empty(weight.shape[-4:] if weight.dim() == 6 else weight.shape, dtype=weight.dtype, device=weight.device)
        nn.init.xavier_uniform_(w)
        return w.expand(weight.shape).clone() if weight.dim() == 6 else w


def amit2019(net: str = "deep", untied: bool = False, nonlin_scale: Optional[float] = None,
             backward_clip: Optional[float] = None, num_classes: int = 10, in_channels: int = 3,
             input_size: int = 32, dropout: bool = True, seed: Optional[int] = None) -> Amit2019Net:
    """Amit's "simple", "deep" or "deep_s" CIFAR network (module docstring).

    untied: the convolutions his parameter file unties (``settings.sparse_layers``; every conv where it
    lists none) replaced by :class:`hebbloss.feedback.LocallyConnected2d` (same initial weights at every
    position); he trains them at ``settings.sparse_batch_size``. nonlin_scale / backward_clip: his
    ``nonlin_scale`` (0.5) and ``b_nonlin_scale`` (simple 0.5, deep 0; 0 is off); default his.
    dropout=False drops his dropout layers.
    """
    key = str(net).lower()
    if key not in SETTINGS:
        raise ValueError(f"amit2019: unknown net {net!r}; choose one of {', '.join(repr(k) for k in SETTINGS)}")
    s = SETTINGS[key]
    scale = s.nonlin_scale if nonlin_scale is None else float(nonlin_scale)
    bscale = s.b_nonlin_scale if backward_clip is None else float(backward_clip)
    if not scale > 0:
        raise ValueError(f"amit2019: nonlin_scale must be > 0, got {nonlin_scale}")
    gen = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
    with gen:
        if seed is not None:
            torch.manual_seed(seed)
        blocks = _blocks(key, scale, bscale, num_classes, in_channels, input_size, dropout)
        model = Amit2019Net(blocks, key, dataclasses.replace(s, nonlin_scale=scale, b_nonlin_scale=bscale))
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
    if untied:
        untie(model, (in_channels, input_size, input_size), targets=list(s.sparse_layers) if s.sparse_layers else None)
    return model


def _blocks(net, scale, bscale, num_classes, in_channels, size, dropout) -> "OrderedDict[str, nn.Module]":
    def conv(cin, cout, k):
        return RampLayer(nn.Conv2d(cin, cout, k, bias=False), scale, bscale)

    def pool(k, s):
        nonlocal size
        size = -(-size // s)
        return AmitMaxPool(k, s)

    def drop(p):
        return nn.Dropout(p) if dropout else nn.Identity()

    b: "OrderedDict[str, nn.Module]" = OrderedDict()
    if net == "simple":  # _pars/simpnet.txt
        b["conv1"] = conv(in_channels, 32, 5)
        b["pool1"] = pool(3, 3)
        b["drop1"] = drop(0.8)
        width = 32
        hidden_drop = 0.3
    elif net == "deep":  # _pars/deepernet.txt
        b["conv0"] = ResidualPair(conv(in_channels, 16, 3), conv(16, 16, 3))
        b["conv1"] = ResidualPair(conv(16, 32, 3), conv(32, 32, 3))
        b["pool1"] = pool(3, 2)
        b["drop1"] = drop(0.5)
        b["conv2"] = ResidualPair(conv(32, 64, 3), conv(64, 64, 3))
        b["pool2"] = pool(3, 2)
        b["conv3"] = ResidualPair(conv(64, 128, 2), conv(128, 128, 3))
        b["pool3"] = pool(3, 2)
        b["drop2"] = drop(0.8)
        width = 128
        hidden_drop = None
    elif net == "deep_s":  # _pars/deepernet_s.txt at commit 17b91d1
        b["conv0"] = ResidualPair(conv(in_channels, 16, 3), conv(16, 16, 3))
        b["pool1"] = pool(3, 3)
        b["drop1"] = drop(0.5)
        b["conv2"] = ResidualPair(conv(16, 64, 3), conv(64, 64, 3))
        b["pool2"] = pool(2, 2)
        b["conv3"] = ResidualPair(conv(64, 64, 2), conv(64, 64, 2))
        b["pool3"] = pool(2, 2)
        b["drop3"] = drop(0.5)
        width = 64
        hidden_drop = None
    b["flatten"] = nn.Flatten()
    b["dense"] = RampLayer(nn.Linear(width * size * size, 500, bias=False), scale, bscale)
    if hidden_drop is not None:
        b["drop2"] = drop(hidden_drop)
    b["final"] = nn.Linear(500, num_classes, bias=False)
    return b
