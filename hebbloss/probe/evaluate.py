"""Probe a model and its baselines layer by layer in one harness (Miconi 2021; Journe et al. 2023).

For each network (the model, then each baseline) the features of every chosen layer are extracted once
(eval mode, no_grad: no plasticity, no threshold updates) and every readout method is fitted on them.
When the features would not fit in ``max_feature_bytes`` (default: a fraction of the memory available
now), ridge is streamed instead: X^T X and X^T Y are accumulated batch by batch and the features
recomputed for scoring, never stored; logistic and the papers' readouts read them from a disk cache.

The papers' readouts (:data:`hebbloss.probe.readouts.READOUTS`: "softhebb", "miconi", or "paper" for the
one of the paper the model comes from) are methods too: they read the paper's layers with the paper's
pooling unless ``layers`` / ``pool`` are given, from float16 feature caches computed once per network.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import ImageDataset, load_dataset
from .baselines import BASELINES, backprop_copy, random_copy
from .feature_cache import SAFETY_FRACTION, FeatureCache, available_memory, cache_feature_sets
from .features import capture_features, iter_features, model_device, resolve_layers
from .logistic import fit_logistic
from .pooling import Pool, check_pool
from .readouts import READOUTS, PaperReadout, paper_readout_for
from .result import ProbeResult
from .ridge import MAX_FEATURES, RidgeSolution, RidgeSweep, candidate_alphas, fit_ridge, held_out_mask

METHODS = ("ridge", "logistic")
PAPER_METHODS = ("paper",) + tuple(READOUTS)  # "paper": the readout of the paper the model comes from
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


class _Data(NamedTuple):
    """The (images, labels) to fit on and to score on, and the number of classes."""

    train: Tuple[torch.Tensor, torch.Tensor]
    test: Tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    name: str


class _Fit(NamedTuple):
    """How each layer's readouts are fitted (the arguments of :func:`evaluate` of that name), the paper's
    readout when one was asked for, and the bytes of features that may stay in memory."""

    methods: List[str]
    alphas: List[float]
    epochs: int
    val_fraction: float
    seed: int
    readout: Optional[PaperReadout] = None
    memory_limit: float = 0.0


# ----------------------------------------------------------------------------------------------- settings and data
def _check_settings(method, baselines, stream, pool, alpha) -> Tuple[List[str], List[float]]:
    """The methods and candidate alphas asked for; ValueError for any unknown or contradictory setting."""
    methods = [method] if isinstance(method, str) else list(method)
    bad = [m for m in methods if m not in METHODS + PAPER_METHODS] + [b for b in baselines if b not in BASELINES]
    if bad or not methods:
        raise ValueError(f"unknown method or baseline {bad or methods}; methods: {METHODS + PAPER_METHODS}, baselines: {BASELINES}")
    paper = [m for m in methods if m in PAPER_METHODS]
    if paper and len(methods) > 1:
        raise ValueError(f"method {paper[0]!r} is a paper's readout with its own layers and pooling; evaluate it alone "
                         f"(method={paper[0]!r}), not together with {[m for m in methods if m != paper[0]]}")
    if stream not in (True, False, "auto"):
        raise ValueError(f"stream must be True, False or 'auto', got {stream!r}")
    if stream is True and methods != ["ridge"]:
        raise ValueError(f"only ridge can be streamed, got method={methods}; use method='ridge', or stream='auto' "
                         "(the other readouts then read features beyond max_feature_bytes from a disk cache)")
    if pool is not None:
        check_pool(pool)
    return methods, candidate_alphas(alpha)


def paper_readout(method: str, model: nn.Module) -> Optional[PaperReadout]:
    """The paper readout that ``method`` names ("softhebb", "miconi", or "paper": the one of the paper
    ``model`` comes from, by :func:`hebbloss.probe.readouts.paper_readout_for`), None for ridge/logistic.
    ValueError naming the model when it has no paper readout."""
    if method == "paper":
        return paper_readout_for(model)
    return READOUTS.get(method)


def _subset(images, labels, limit, seed):
    """A sorted random subset of ``limit`` samples (all of them when ``limit`` is None or not smaller)."""
    if limit is None or limit >= images.shape[0]:
        return images, labels
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return images[idx], labels[idx]


def _probe_data(dataset: Union[ImageDataset, str], max_train, max_test, seed) -> _Data:
    """The dataset (loaded by name if need be) cut to the random subsets asked for."""
    if isinstance(dataset, str):
        dataset = load_dataset(dataset)
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an ImageDataset or a dataset name, got {type(dataset).__name__}")
    return _Data(_subset(dataset.train_images, dataset.train_labels, max_train, seed),
                 _subset(dataset.test_images, dataset.test_labels, max_test, seed + 1),
                 max(dataset.num_classes, int(dataset.train_labels.max()) + 1), dataset.name)


def _must_stream(model, chosen, data: _Data, extract, max_feature_bytes) -> bool:
    """Whether the float32 features of all chosen layers exceed ``max_feature_bytes`` (sized from one forward
    pass of two images)."""
    dims = next(iter_features(model, chosen, data.train[0][:2], **extract))
    return sum(f.shape[1] for f in dims.values()) * 4 * (data.train[0].shape[0] + data.test[0].shape[0]) > max_feature_bytes


def _check_dim(layer: str, dim: int) -> None:
    """ValueError naming ``layer`` when its ``dim`` features are too many for a ridge X^T X."""
    if dim > MAX_FEATURES:
        raise ValueError(
            f"layer '{layer}' gives {dim} features after pooling; a ridge probe needs a {dim}x{dim} X^T X "
            f"({dim ** 2 * 8 / 2 ** 30:.1f} GiB in float64): pool it (pool='quadrants', 'global' or a small grid such as 4) "
            f"to at most {MAX_FEATURES} features"
        )


# ----------------------------------------------------------------------------------------------- networks
def _networks(model, baselines, data: _Data, backprop_epochs, mean, std, seed) -> List[Tuple[str, Callable[[], nn.Module]]]:
    """(label, builder) of the model and of each baseline asked for; baselines are built only when probed."""
    networks = [("model", lambda: model)]
    if "random" in baselines:
        networks.append(("random", lambda: random_copy(model, seed + RANDOM_SEED_OFFSET)))
    if "backprop" in baselines:
        networks.append(("backprop", lambda: backprop_copy(model, data.train[0], data.train[1], data.num_classes, backprop_epochs,
                                                           mean=mean, std=std, seed=seed + RANDOM_SEED_OFFSET)))
    return networks


def _same_layers(net: nn.Module, chosen) -> List[Tuple[str, Optional[nn.Module]]]:
    """The layers of ``net`` (the model or a copy of it) with the names chosen on the model."""
    modules = dict(net.named_modules())
    return [(n, None if m is None else modules[n]) for n, m in chosen]


# ----------------------------------------------------------------------------------------------- features in memory
def _fit_layer(name, x, xt, data: _Data, fit: _Fit) -> Iterator[Tuple[str, ProbeResult]]:
    """(method, result) of each readout fitted on the train features ``x`` and scored on ``xt`` too."""
    if "ridge" in fit.methods:
        _check_dim(name, x.shape[1])
    for m in fit.methods:
        if m == "ridge":
            yield m, fit_ridge(x, data.train[1], xt, data.test[1], alpha=fit.alphas, num_classes=data.num_classes,
                               val_fraction=fit.val_fraction, seed=fit.seed)
        else:
            yield m, fit_logistic(x, data.train[1], xt, data.test[1], epochs=fit.epochs, num_classes=data.num_classes, seed=fit.seed)


def _stored_rows(label, net, chosen, data: _Data, extract, fit: _Fit, bar) -> Iterator[ProbeRow]:
    """Capture the features of ``net`` once, then one row per layer and method fitted on them."""
    names = [n for n, _ in chosen]
    feats = [capture_features(net, names, images, out_device=extract["device"], **extract)
             for images in (data.train[0], data.test[0])]
    bar.update(1)
    for name in names:
        x, xt = feats[0][name], feats[1][name]
        for method, res in _fit_layer(name, x, xt, data, fit):
            yield ProbeRow(label, name, method, x.shape[1], res.train_acc, res.test_acc, res.alpha)
            bar.update(1)


# ----------------------------------------------------------------------------------------------- streamed ridge
def _accumulate(net, chosen, data: _Data, alphas, extract, val_fraction, seed) -> Dict[str, RidgeSweep]:
    """One pass over the training images: each layer's ridge sums, split by :func:`held_out_mask`."""
    images, labels = data.train
    held = held_out_mask(images.shape[0], alphas, val_fraction, seed)
    sweeps: Dict[str, RidgeSweep] = {}
    start = 0
    for feats in iter_features(net, chosen, images, **extract):
        b = next(iter(feats.values())).shape[0]
        for name, f in feats.items():
            if name not in sweeps:
                _check_dim(name, f.shape[1])
                sweeps[name] = RidgeSweep(f.shape[1], data.num_classes, alphas, device=f.device)
            sweeps[name].update(f, labels[start:start + b], held[start:start + b])
        start += b
    return sweeps


def _streamed_accuracy(net, chosen, sols: Dict[str, RidgeSolution], images, labels, extract) -> Dict[str, float]:
    """Each layer's accuracy on ``images``, recomputing the features batch by batch."""
    correct, start = {n: 0 for n in sols}, 0
    for feats in iter_features(net, chosen, images, **extract):
        b = next(iter(feats.values())).shape[0]
        for name, f in feats.items():
            correct[name] += int((sols[name].predict(f).cpu() == labels[start:start + b]).sum())
        start += b
    return {n: c / max(images.shape[0], 1) for n, c in correct.items()}


def _streamed_ridge(net, chosen, data: _Data, alphas, extract, val_fraction, seed) -> Dict[str, Tuple[int, ProbeResult]]:
    """Ridge per layer without storing features: accumulate, solve, then recompute features to score."""
    sweeps = _accumulate(net, chosen, data, alphas, extract, val_fraction, seed)
    sols = {name: sweeps.pop(name).solve() for name in list(sweeps)}  # each layer's sums freed once solved
    train, test = (_streamed_accuracy(net, chosen, sols, *split, extract) for split in (data.train, data.test))
    return {n: (s.weight.shape[0], ProbeResult(train[n], test[n], s.alpha)) for n, s in sols.items()}


def _streamed_rows(label, net, chosen, data: _Data, extract, fit: _Fit, bar) -> Iterator[ProbeRow]:
    """One ridge row per layer of ``net``, streamed."""
    for name, (dim, res) in _streamed_ridge(net, chosen, data, fit.alphas, extract, fit.val_fraction, fit.seed).items():
        yield ProbeRow(label, name, "ridge", dim, res.train_acc, res.test_acc, res.alpha)
    bar.update(1 + len(chosen) * len(fit.methods))


# ----------------------------------------------------------------------------------------------- cached features
def _cache(net, chosen, data: _Data, extract, fit: _Fit) -> Tuple[Dict[str, FeatureCache], Dict[str, FeatureCache]]:
    """The train and test features of ``net`` as FeatureCaches (float16 for a paper readout, float32 for
    logistic or when a feature exceeds float16's range), in memory while they fit in ``fit.memory_limit``
    bytes, the rest in temporary files deleted with the caches."""
    train, test = cache_feature_sets(net, [n for n, _ in chosen], [data.train[0], data.test[0]],
                                     memory_limit=fit.memory_limit,
                                     dtype=None if fit.readout is not None else torch.float32, **extract)
    return train, test


def _fit_cached(x: FeatureCache, xt: FeatureCache, data: _Data, fit: _Fit, device) -> Tuple[str, ProbeResult]:
    """(method, result) of the paper's readout, or of logistic, fitted on cached features."""
    if fit.readout is None:
        return "logistic", fit_logistic(x, data.train[1], xt, data.test[1], epochs=fit.epochs, num_classes=data.num_classes,
                                        seed=fit.seed)
    options = {"epochs": fit.epochs, "num_classes": data.num_classes, "device": device}
    accepted = inspect.signature(fit.readout.fit).parameters
    options = {k: v for k, v in options.items() if k in accepted}
    return fit.readout.name, fit.readout.fit(x, data.train[1], xt, data.test[1], seed=fit.seed, **options)


def _cached_rows(label, net, chosen, data: _Data, extract, fit: _Fit, bar) -> Iterator[ProbeRow]:
    """Cache the features of ``net`` once, then one row per layer fitted on them (the paper's readout, or logistic)."""
    train, test = _cache(net, chosen, data, extract, fit)
    bar.update(1)
    for name, _ in chosen:
        method, res = _fit_cached(train[name], test[name], data, fit, extract["device"])
        yield ProbeRow(label, name, method, train[name].dim, res.train_acc, res.test_acc, res.alpha)
        bar.update(1)


def _large_rows(label, net, chosen, data: _Data, extract, fit: _Fit, bar) -> Iterator[ProbeRow]:
    """Features beyond the memory limit: ridge streamed, logistic from a disk cache."""
    if "ridge" in fit.methods:
        yield from _streamed_rows(label, net, chosen, data, extract, fit._replace(methods=["ridge"]), bar)
    if "logistic" in fit.methods:
        yield from _cached_rows(label, net, chosen, data, extract, fit._replace(methods=["logistic"]), bar)


# ----------------------------------------------------------------------------------------------- the harness
def evaluate(
    model: nn.Module,
    dataset: Union[ImageDataset, str],
    layers=None,
    method: Union[str, Sequence[str]] = "ridge",
    pool: Optional[Pool] = None,
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
    max_feature_bytes: Optional[float] = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    use_timm: bool = True,
    progress: bool = False,
) -> ProbeReport:
    """Per-layer train/test accuracy of linear readouts of ``model`` and of each baseline on ``dataset``.

    layers: as in :func:`capture_features` (None: timm feature stages, else every Linear/Conv; "input"
    probes the pixels); method: "ridge" (closed form, ``alpha`` a value or a list swept on a held-out
    ``val_fraction``) and/or "logistic" (SoftHebb recipe, ``epochs``), or alone one of :data:`PAPER_METHODS`:
    "softhebb" (SoftHebb's readout, Journe et al. 2023, ``epochs`` of it), "miconi" (Miconi 2021's ridge) or
    "paper" (the readout of the paper ``model`` comes from, by its recipe's name; ValueError when there is
    none); these default ``layers`` and ``pool`` to the paper's and label their rows with the readout's name.
    pool: None gives "quadrants" (or the paper readout's pooling); baselines: "random" (re-initialised
    copy) and/or "backprop" (copy trained end to end for ``backprop_epochs``); mean/std normalise the
    images per channel, as the model saw them in training; max_train/max_test: random subsets.
    ``max_feature_bytes``: features that may be held in memory (None: SAFETY_FRACTION of the memory
    available now); beyond it ridge is streamed and the other readouts read their features from a disk
    cache. ``stream``: True (ridge only), False or "auto" (when the features of all layers exceed
    ``max_feature_bytes``). The model is not changed (eval mode and no_grad during extraction).
    ``progress`` shows a tqdm bar over networks, feature extraction and readouts.
    """
    t0 = time.perf_counter()
    methods, alphas = _check_settings(method, baselines, stream, pool, alpha)
    readout = paper_readout(methods[0], model)
    if readout is not None:
        layers = list(readout.layers(model).values()) if layers is None else layers
        pool = readout.pool if pool is None else pool
    pool = "quadrants" if pool is None else pool
    memory_limit = available_memory() * SAFETY_FRACTION if max_feature_bytes is None else max_feature_bytes
    data = _probe_data(dataset, max_train, max_test, seed)
    chosen = resolve_layers(model, layers)
    device = torch.device(device) if device is not None else model_device(model)
    extract = dict(batch_size=batch_size, pool=pool, device=device, mean=mean, std=std, use_timm=use_timm)
    if readout is not None:
        probe_rows = _cached_rows
    else:
        if stream == "auto":
            stream = _must_stream(model, chosen, data, extract, memory_limit)
        probe_rows = _large_rows if stream else _stored_rows
    fit = _Fit(methods, alphas, epochs, val_fraction, seed, readout, memory_limit)

    report = ProbeReport(dataset=data.name, pool=pool, num_train=data.train[0].shape[0], num_test=data.test[0].shape[0])
    networks = _networks(model, baselines, data, backprop_epochs, mean, std, seed)
    bar = tqdm(total=len(networks) * (1 + len(chosen) * len(methods)), desc="probe", disable=not progress, leave=False)
    for label, build in networks:
        bar.set_postfix_str(label)
        net = build().to(device) if label != "model" else model
        report.rows.extend(probe_rows(label, net, _same_layers(net, chosen), data, extract, fit, bar))
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report
