"""What a ``hebbloss`` run leaves in its results folder: ``results.json``, a plot of linear-probe
accuracy per layer next to the random-weights baseline (the comparison of Miconi 2021, Fig. 2), and a
grid of the first plastic layer's learned filters. Every file is written atomically.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..atomic import atomic_file, write_json

RESULTS = "results.json"
ACCURACY_PNG = "accuracy_per_layer.png"
FILTERS_PNG = "filters.png"


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return repr(obj)


def read_results(folder: Path) -> dict:
    """The folder's results.json, or {} when there is none yet."""
    path = Path(folder) / RESULTS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); move it away and run again") from None


def update_results(folder: Path, **sections: Any) -> Path:
    """Merge ``sections`` into the folder's results.json (written atomically) and return its path."""
    data = read_results(folder)
    data.update(sections)
    return write_json(Path(folder) / RESULTS, data, sort_keys=True, default=_json_default)


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def by_network(rows, method: Optional[str] = None) -> dict:
    """``{network: {layer: row}}`` from a probe report's rows (dicts with network, layer, method,
    train_acc, test_acc), keeping one method (the first one present when ``method`` is None)."""
    rows = list(rows)
    if method is None and rows:
        method = rows[0]["method"]
    out: dict = {}
    for r in rows:
        if r["method"] == method:
            out.setdefault(r["network"], {})[r["layer"]] = r
    return out


def plot_accuracy(results: Mapping[str, Mapping[str, Any]], path: Path, title: str = "", chance: Optional[float] = None) -> Path:
    """Line plot of train (dashed) and test (solid) probe accuracy per layer, one colour per model
    ("model", "random", ...), on shared axes. ``results[model][layer]`` has ``train_acc``, ``test_acc``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(results)
    layers = list(next(iter(results.values())).keys()) if results else []
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(layers) + 2.5), 3.6))
    xs = range(len(layers))
    colours = {"model": "tab:blue", "random": "tab:gray", "backprop": "tab:orange"}
    for i, name in enumerate(names):
        colour = colours.get(name, f"C{i + 2}")
        label = "trained (Hebbian)" if name == "model" else f"{name} weights" if name == "random" else name
        for split, style in (("test", "-"), ("train", "--")):
            ys = [_acc(results[name].get(layer), split) for layer in layers]
            ax.plot(xs, ys, style, marker="o", color=colour, label=f"{label}, {split}")
    values = [v for name in names for r in results[name].values() for v in (_acc(r, "train"), _acc(r, "test")) if v == v]
    low = max(0.0, min(values, default=0.0) - 0.1)  # zoom on the data: differences between layers stay visible
    if chance is not None and chance >= low:
        ax.axhline(chance, color="black", lw=0.8, ls=":", label="chance")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(layers, rotation=30 if max(map(len, layers), default=0) > 8 else 0, ha="right")
    ax.set_xlabel("layer")
    ax.set_ylabel("linear probe accuracy")
    ax.set_ylim(low, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    return _save_figure(fig, Path(path))


def _acc(result, split: str) -> float:
    if result is None:
        return math.nan
    if isinstance(result, Mapping):
        return float(result[f"{split}_acc"])
    return float(getattr(result, f"{split}_acc"))


def filter_images(module: nn.Module, image_shape) -> torch.Tensor:
    """The learned filters of a plastic layer as images [units, C, h, w]: a conv's kernels, or a Linear's
    rows reshaped to the input image when they have its size; otherwise each row as a 1-pixel-high strip."""
    weight = module.weight.detach().float().cpu()  # the effective (masked, if pruned) weight
    if weight.dim() == 4:
        if weight.shape[1] not in (1, 3):
            weight = weight[:, :1]  # deeper layer: show the first input channel
        return weight
    if weight.dim() == 2:
        c, h, w = image_shape
        if weight.shape[1] == c * h * w:
            return weight.reshape(-1, c, h, w)
        return weight.reshape(weight.shape[0], 1, 1, weight.shape[1])
    return weight.reshape(weight.shape[0], 1, 1, -1)


def plot_filters(module: nn.Module, path: Path, image_shape, title: str = "", max_filters: int = 256) -> Path:
    """The layer's filters (:func:`filter_images`) on one symmetric colour scale with its colour bar, so
    that filters can be compared and 0 is always the same colour: one-channel filters in a diverging
    map (red positive, blue negative), RGB filters as colour images (grey = 0), rows that are not
    images as a units x inputs matrix. Tiles of up to an inch each, in a near-square grid."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    images = filter_images(module, image_shape)
    total, images = images.shape[0], images[:max_filters]
    n, c, h, w = images.shape
    scale = float(images.abs().max()) or 1.0
    shown = f"{n} of {total} units" if n < total else f"{n} units"
    in_channels = module.weight.shape[1] if module.weight.dim() == 4 else c
    if c == 1 and in_channels > 1:
        shown += f", input channel 1 of {in_channels}"
    if h == 1:  # rows that are not images: one matrix
        fig, ax = plt.subplots(figsize=(min(12.0, 3.0 + 0.02 * w), min(10.0, 1.5 + 0.15 * n)))
        im = ax.imshow(images.reshape(n, w).numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto",
                       interpolation="nearest")
        ax.set_xlabel("input")
        ax.set_ylabel("unit")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="weight")
    else:
        cols = max(1, math.ceil(math.sqrt(n)))
        rows = math.ceil(n / cols)
        pad = max(1, round(max(h, w) / 8))
        grid = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), math.nan)
        for i in range(n):
            top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
            grid[top:top + h, left:left + w] = images[i].permute(1, 2, 0)
        tile = min(0.9, max(0.3, 9.0 / cols))  # inches per filter: readable, and the figure at most ~10 inches
        fig, ax = plt.subplots(figsize=(cols * tile + 1.6, rows * tile * h / w + 1.0))
        if c == 1:
            cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.6")  # grey separators, white is 0
            im = ax.imshow(grid[..., 0].numpy(), cmap=cmap, vmin=-scale, vmax=scale, interpolation="nearest")
            label = "weight"
        else:  # each channel's weight mapped to its intensity on the same scale: grey is 0
            rgb = (0.5 + grid / (2 * scale)).nan_to_num(1.0).clamp(0, 1)
            ax.imshow(rgb.numpy(), interpolation="nearest")
            im = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(-scale, scale), cmap="gray")
            label = "weight (each of R, G, B)"
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
        ax.set_axis_off()
        shown += f", {h}x{w}"
    ax.set_title(f"{title}\n{shown}, shared scale ±{scale:.3g}" if title else f"{shown}, shared scale ±{scale:.3g}", fontsize=9)
    return _save_figure(fig, Path(path))
