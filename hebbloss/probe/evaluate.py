"""Probe a model and its baselines layer by layer in one harness (Miconi 2021; Journe et al. 2023).

For each network (the model, then each baseline) the features of every chosen layer are extracted once
(eval mode, no_grad: no plasticity, no threshold updates) and every readout method is fitted on them.
When the features would not fit in ``max_feature_bytes``, ridge is streamed instead: X^T X and X^T Y
are accumulated batch by batch and the features recomputed for scoring, never stored.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import ImageDataset, load_dataset
from .baselines import BASELINES, backprop_copy, random_copy
from .features import capture_features, iter_features, model_device, resolve_layers
from .logistic import fit_logistic
from .pooling import Pool, check_pool
from .result import ProbeResult
from .ridge import MAX_FEATURES, RidgeAccumulator, _alphas, choose_alpha, fit_ridge, split_mask

METHODS = ("ridge", "logistic")
RANDOM_SEED_OFFSET = 104729  # baselines draw weights apart from a model built right after torch.manual_seed(seed)


@dataclass
class ProbeRow:
    """One readout: network ("model" or a baseline), layer, method, feature size and its accuracies."""

    network: str
    layer: str
    method: str
    dim: int
    train_acc: float
    test_acc: float
    alpha: Optional[float] = None


@dataclass
class ProbeReport:
    """Per-layer train/test accuracy of linear probes on a model and its baselines."""

    rows: List[ProbeRow] = field(default_factory=list)
    dataset: str = ""
    pool: Pool = "quadrants"
    num_train: int = 0
    num_test: int = 0
    seconds: float = 0.0

    def result(self, layer: str, network: str = "model", method: Optional[str] = None) -> ProbeResult:
        """The ProbeResult of ``layer`` of ``network`` (first method when ``method`` is None)."""
        for r in self.rows:
            if r.layer == layer and r.network == network and method in (None, r.method):
                return ProbeResult(r.train_acc, r.test_acc, r.alpha)
        raise KeyError(f"no result for layer={layer!r}, network={network!r}, method={method!r}; have {sorted({(r.network, r.layer, r.method) for r in self.rows})}")

    def to_dict(self) -> dict:
        """A JSON-ready dict: settings and one entry per readout."""
        return {
            "dataset": self.dataset, "pool": list(self.pool) if isinstance(self.pool, tuple) else self.pool,
            "num_train": self.num_train, "num_test": self.num_test, "seconds": round(self.seconds, 3),
            "rows": [asdict(r) for r in self.rows],
        }

    def table(self) -> str:
        """A printable text table: one line per layer, test (train) accuracy in % per network, per method."""
        networks = list(dict.fromkeys(r.network for r in self.rows))
        lines = []
        for method in dict.fromkeys(r.method for r in self.rows):
            rows = [r for r in self.rows if r.method == method]
            layers = list(dict.fromkeys(r.layer for r in rows))
            cell = {(r.network, r.layer): r for r in rows}
            width = max([len(l) for l in layers] + [5])
            lines.append(f"{self.dataset}: {method} probe, pool={self.pool}, train {self.num_train}, test {self.num_test}; "
                         "test % (train %)")
            lines.append(f"{'layer':<{width}}  {'dim':>6}  " + "  ".join(f"{n:>15}" for n in networks))
            for layer in layers:
                dim = next(cell[(n, layer)].dim for n in networks if (n, layer) in cell)
                vals = [cell.get((n, layer)) for n in networks]
                text = [f"{100 * v.test_acc:6.2f} ({100 * v.train_acc:6.2f})" if v else f"{'-':>15}" for v in vals]
                lines.append(f"{layer:<{width}}  {dim:>6}  " + "  ".join(text))
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"


def _subset(images, labels, limit, seed):
    if limit is None or limit >= images.shape[0]:
        return images, labels
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return images[idx], labels[idx]


def _check_dim(layer: str, dim: int) -> None:
    if dim > MAX_FEATURES:
        raise ValueError(
            f"layer '{layer}' gives {dim} features after pooling; a ridge probe needs a {dim}x{dim} X^T X "
            f"({dim ** 2 * 8 / 2 ** 30:.1f} GiB in float64): pool it (pool='quadrants', 'global' or a small grid such as 4) "
            f"to at most {MAX_FEATURES} features"
        )


def _streamed_ridge(net, chosen, tr, te, k, alphas, common, val_fraction, seed) -> Dict[str, Tuple[int, ProbeResult]]:
    """Ridge per layer without storing features: accumulate, solve, then recompute features to score."""
    sweep = len(alphas) > 1
    held = split_mask(tr[0].shape[0], val_fraction, seed) if sweep else torch.zeros(tr[0].shape[0], dtype=torch.bool)
    accs: Dict[str, List[Optional[RidgeAccumulator]]] = {}
    start = 0
    for feats in iter_features(net, chosen, tr[0], **common):
        b = next(iter(feats.values())).shape[0]
        y, h = tr[1][start:start + b], held[start:start + b]
        for name, f in feats.items():
            if name not in accs:
                _check_dim(name, f.shape[1])
                accs[name] = [RidgeAccumulator(f.shape[1], k, device=f.device) for _ in range(1 + sweep)] + [None]
            h_dev = h.to(f.device)
            accs[name][0].update(f[~h_dev], y[~h])
            if sweep:
                accs[name][1].update(f[h_dev], y[h])
        start += b
    sols = {}
    for name in list(accs):
        fit, val = accs.pop(name)[:2]
        a = alphas[0]
        if val is not None:
            a = choose_alpha(fit, val, alphas)
            fit += val
        sols[name] = fit.solve(a)
        del fit, val
    scores = {}
    for split, (images, labels) in (("train", tr), ("test", te)):
        correct, start = {n: 0 for n in sols}, 0
        for feats in iter_features(net, chosen, images, **common):
            b = next(iter(feats.values())).shape[0]
            for name, f in feats.items():
                correct[name] += int((sols[name].predict(f).cpu() == labels[start:start + b]).sum())
            start += b
        scores[split] = {n: c / max(images.shape[0], 1) for n, c in correct.items()}
    return {n: (s.weight.shape[0], ProbeResult(scores["train"][n], scores["test"][n], s.alpha)) for n, s in sols.items()}


def evaluate(
    model: nn.Module,
    dataset: Union[ImageDataset, str],
    layers=None,
    method: Union[str, Sequence[str]] = "ridge",
    pool: Pool = "quadrants",
    baselines: Sequence[str] = ("random",),
    alpha=None,
    epochs: int = 50,
    batch_size: int = 256,
    device=None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    max_train: Optional[int] = None,
    max_test: Optional[int] = None,
    backprop_epochs: int = 1,
    stream: Union[bool, str] = "auto",
    max_feature_bytes: int = 2 ** 31,
    val_fraction: float = 0.1,
    seed: int = 0,
    use_timm: bool = True,
    progress: bool = False,
) -> ProbeReport:
    """Per-layer train/test accuracy of linear readouts of ``model`` and of each baseline on ``dataset``.

    layers: as in :func:`capture_features` (None: timm feature stages, else every Linear/Conv; "input"
    probes the pixels); method: "ridge" (closed form, ``alpha`` a value or a list swept on a held-out
    ``val_fraction``) and/or "logistic" (SoftHebb recipe, ``epochs``); baselines: "random" (re-initialised
    copy) and/or "backprop" (copy trained end to end for ``backprop_epochs``); mean/std normalise the
    images per channel, as the model saw them in training; max_train/max_test: random subsets.
    ``stream``: True, False or "auto" (when the features of all layers exceed ``max_feature_bytes``); only
    ridge can be streamed. The model is not changed (eval mode and no_grad during extraction).
    ``progress`` shows a tqdm bar over networks, feature extraction and readouts.
    """
    t0 = time.perf_counter()
    methods = [method] if isinstance(method, str) else list(method)
    bad = [m for m in methods if m not in METHODS] + [b for b in baselines if b not in BASELINES]
    if bad or not methods:
        raise ValueError(f"unknown method or baseline {bad or methods}; methods: {METHODS}, baselines: {BASELINES}")
    if stream not in (True, False, "auto"):
        raise ValueError(f"stream must be True, False or 'auto', got {stream!r}")
    if stream is True and "logistic" in methods:
        raise ValueError("only ridge can be streamed; use method='ridge', or pool the features so they fit in memory")
    check_pool(pool)
    alphas = _alphas(alpha)
    if isinstance(dataset, str):
        dataset = load_dataset(dataset)
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an ImageDataset or a dataset name, got {type(dataset).__name__}")
    chosen = resolve_layers(model, layers)
    tr = _subset(dataset.train_images, dataset.train_labels, max_train, seed)
    te = _subset(dataset.test_images, dataset.test_labels, max_test, seed + 1)
    k = max(dataset.num_classes, int(dataset.train_labels.max()) + 1)
    device = torch.device(device) if device is not None else model_device(model)
    common = dict(batch_size=batch_size, pool=pool, device=device, mean=mean, std=std, use_timm=use_timm)

    if stream == "auto":  # feature size per sample from one forward pass of two images
        dims = next(iter_features(model, chosen, tr[0][:2], **common))
        stream = sum(f.shape[1] for f in dims.values()) * 4 * (tr[0].shape[0] + te[0].shape[0]) > max_feature_bytes
        if stream and "logistic" in methods:
            raise ValueError(
                f"the features of {[n for n, _ in chosen]} exceed max_feature_bytes={max_feature_bytes}; logistic needs them "
                "in memory: pool them (pool='quadrants' or 'global'), probe fewer layers or samples, or raise max_feature_bytes"
            )

    report = ProbeReport(dataset=dataset.name, pool=pool, num_train=tr[0].shape[0], num_test=te[0].shape[0])
    networks = [("model", lambda: model)]
    if "random" in baselines:
        networks.append(("random", lambda: random_copy(model, seed + RANDOM_SEED_OFFSET)))
    if "backprop" in baselines:
        networks.append(("backprop", lambda: backprop_copy(model, tr[0], tr[1], k, backprop_epochs, mean=mean, std=std, seed=seed + RANDOM_SEED_OFFSET)))
    bar = tqdm(total=len(networks) * (1 + len(chosen) * len(methods)), desc="probe", disable=not progress, leave=False)
    for label, build in networks:
        bar.set_postfix_str(label)
        net = build().to(device) if label != "model" else model
        modules = dict(net.named_modules())
        net_chosen = [(n, None if m is None else modules[n]) for n, m in chosen]
        if stream:
            for name, (dim, res) in _streamed_ridge(net, net_chosen, tr, te, k, alphas, common, val_fraction, seed).items():
                report.rows.append(ProbeRow(label, name, "ridge", dim, res.train_acc, res.test_acc, res.alpha))
            bar.update(1 + len(chosen) * len(methods))
            continue
        feats = [capture_features(net, [n for n, _ in chosen], imgs, out_device=device, **common) for imgs in (tr[0], te[0])]
        bar.update(1)
        for name, _ in chosen:
            x, xt = feats[0][name], feats[1][name]
            if "ridge" in methods:
                _check_dim(name, x.shape[1])
            for m in methods:
                if m == "ridge":
                    res = fit_ridge(x, tr[1], xt, te[1], alpha=alphas, num_classes=k, val_fraction=val_fraction, seed=seed)
                else:
                    res = fit_logistic(x, tr[1], xt, te[1], epochs=epochs, num_classes=k, seed=seed)
                report.rows.append(ProbeRow(label, name, m, x.shape[1], res.train_acc, res.test_acc, res.alpha))
                bar.update(1)
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report
