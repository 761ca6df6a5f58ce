"""The linear readouts of the papers, as their authors' code runs them, on cached features of a frozen network.

**SoftHebb** (Journe et al. 2023, ICLR; code: github.com/NeuromorphicComputing/SoftHebb), :func:`softhebb_readout`:

- features: the flattened output of the last block (``nn.Flatten`` of block N's pooled map, C-major; 24,576
  values at depth 1, 2 and 3 on CIFAR-10), with no standardisation or BatchNorm before the classifier (the
  classifier block "b3" of ``presets.json`` 4SoftHebbCnnCIFAR has ``operation: flatten`` only); the frozen
  blocks run in eval mode (``model.py`` MultiLayer.train(blocks=[classifier]) puts every other block in
  eval mode, so their BatchNorms use running statistics and the features are fixed);
- classifier: ``Dropout(0.5)`` then ``nn.Linear(D, classes)`` with PyTorch's default initialisation
  (``layer.py`` generate_block / BasicBlock.forward: operations, dropout, layer; ``presets.json`` "dropout":
  0.5). ``demo.py`` instead draws the weights uniform in [0, 0.1105) (DeepSoftHebb.__init__);
- loss and optimizer: ``nn.CrossEntropyLoss`` (mean), ``optim.Adam(lr=1e-3)``, default betas, no weight
  decay (``train.py`` run_sup; lr from ``presets.json`` layer.MLP.default.lr_sup = 0.001);
- data: batches of 64 (``presets.json`` dataset.default.batch_size), shuffled every epoch, the last partial
  batch kept, all 50,000 training images (validation off by default: ``ray_search.py`` --validation-sup
  False, ``utils.py`` load_config_dataset), no augmentation for CIFAR-10/MNIST/Fashion-MNIST
  (``presets.json`` "augmentation": false; STL-10's "100aug" readout augments and cannot use a cache);
  images scaled to [0, 1] with no mean/std normalisation (``dataset.py`` FastCIFAR10: ``norm`` is commented
  out), the BatchNorm of each block standardising instead;
- epochs: 50 for CIFAR-10 (``README.md`` commands use --dataset-sup CIFAR10_50); ``presets.json`` gives
  MNIST and Fashion-MNIST 100 by default (the README has no command for the paper's 99.4% MNIST network);
- schedule: ``utils.py`` CustomStepLR, stepped after every epoch (``train.py`` run_sup): the learning rate
  is halved after epochs int(E * r), r in 0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9 when E >= 50; after int(E/2)
  and int(3E/4) when 20 <= E < 50; never when E < 20 (``demo.py`` uses the seven ratios for any E). For
  E = 50: after epochs 10, 17, 25, 30, 35, 40 and 45;
- reported: test accuracy after the last epoch (``train.py`` run_sup logs the final epoch).

**Miconi 2021** (arXiv:2107.01729; code: github.com/ThomasMiconi/HebbianCNNPyTorch, ``HebbGrad_Github.ipynb``,
the version that "generates the actual results"), :func:`miconi_readout`:

- features of layer l < L: the mean over each of the 2x2 quadrants of ``xs[l+1]``, the pooled output of
  layer l after the per-sample standardisation that opens layer l+1 (``x - mean(x, dim=(1,2,3))`` divided
  by ``1e-10 + std(x, dim=(1,2,3))``); of the last layer: its pooled output ``x`` flattened, not
  standardised (cell 2, "layerquads" and "trainouts"). In hebbloss's ``miconi2021`` network these are the
  outputs of ``norm2``, ``norm3`` (quadrant-pooled) and ``pool3`` (2x2, so quadrants = flattening);
- classifier: ``sklearn.linear_model.Ridge()`` (alpha = 1.0, with intercept, no feature scaling) fitted to
  one-hot labels, prediction = argmax of the 10 outputs (cells 4 and 5); one pass over the training and
  the test set with frozen weights (epochs NBLEARNINGEPOCHS and NBLEARNINGEPOCHS + 1 of cell 2), through
  ``transform_train``, which flips images horizontally at random (also for the test set); the adaptive
  thresholds keep moving during these two passes (their update is outside ``if UNLAB``), while
  hebbloss computes features in eval mode with frozen thresholds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .feature_cache import FeatureCache, PathLike, as_cache, cache_feature_sets
from .pooling import Pool
from .result import ProbeResult
from .ridge import RidgeAccumulator

Features = Union[FeatureCache, torch.Tensor]

SOFTHEBB_PAPER = "Journe, Garcia Rodriguez, Guo & Moraitis 2023, Hebbian deep learning without feedback, ICLR"
SOFTHEBB_EPOCHS = 50          # presets.json dataset CIFAR10 "50" (README: --dataset-sup CIFAR10_50)
SOFTHEBB_LR = 1e-3            # presets.json layer MLP default lr_sup; optim.Adam in train.py run_sup
SOFTHEBB_BATCH_SIZE = 64      # presets.json dataset default batch_size
SOFTHEBB_DROPOUT = 0.5        # presets.json model 4SoftHebbCnnCIFAR b3 dropout
SOFTHEBB_LR_RATIOS = (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)  # utils.py CustomStepLR, nb_epochs >= 50
SOFTHEBB_LR_FACTOR = 0.5      # utils.py CustomStepLR.get_lr

MICONI_PAPER = "Miconi 2021, Multi-layer Hebbian networks with modern deep learning frameworks, arXiv:2107.01729"
MICONI_ALPHA = 1.0            # sklearn.linear_model.Ridge() default, HebbGrad_Github.ipynb cell 4
EVAL_BYTES = 8 * 2 ** 20  # float32 bytes per evaluation batch (larger buffers cost page faults)


def _labels(y: torch.Tensor, n: int, what: str) -> torch.Tensor:
    y = torch.as_tensor(y).reshape(-1).long().cpu()
    if y.shape[0] != n:
        raise ValueError(f"{what}: {n} feature rows but {y.shape[0]} labels")
    return y


def _num_classes(num_classes: Optional[int], *labels: torch.Tensor) -> int:
    k = num_classes if num_classes is not None else int(max(int(y.max()) for y in labels if y.numel())) + 1
    bad = [int(y.min()) for y in labels if y.numel() and (y.min() < 0 or y.max() >= k)]
    if bad or k < 2:
        raise ValueError(f"labels must be class indices in 0..{k - 1} with at least 2 classes")
    return k


def _check(train: FeatureCache, test: FeatureCache) -> None:
    if train.dim != test.dim or len(train) == 0:
        raise ValueError(f"train features [{len(train)}, {train.dim}] and test features [{len(test)}, {test.dim}] "
                         "must be non-empty with the same width")


def softhebb_milestones(epochs: int) -> List[int]:
    """The epochs after which SoftHebb's readout halves its learning rate (utils.py CustomStepLR):
    int(epochs * r) for r in SOFTHEBB_LR_RATIOS when epochs >= 50, int(epochs / 2) and int(3 epochs / 4)
    when 20 <= epochs < 50, none below 20."""
    if epochs < 20:
        return []
    if epochs < 50:
        return [int(epochs * 0.5), int(epochs * 0.75)]
    return [int(epochs * r) for r in SOFTHEBB_LR_RATIOS]


def softhebb_scheduler(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.MultiStepLR:
    """torch's MultiStepLR with SoftHebb's milestones and factor 0.5, to be stepped once per epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, sorted(set(softhebb_milestones(epochs))), SOFTHEBB_LR_FACTOR)


def softhebb_learning_rates(epochs: int = SOFTHEBB_EPOCHS, lr: float = SOFTHEBB_LR) -> List[float]:
    """The learning rate of each epoch of SoftHebb's readout, as :func:`softhebb_readout` sets it."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = softhebb_scheduler(opt, epochs)
    rates = []
    for _ in range(epochs):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def _eval_batch(cache: FeatureCache) -> int:
    return max(1, EVAL_BYTES // (4 * cache.dim))


def _accuracy(scores: Callable[[torch.Tensor], torch.Tensor], cache: FeatureCache, y: torch.Tensor, device) -> float:
    if len(cache) == 0:
        return float("nan")
    correct = 0
    with torch.no_grad():
        for idx, x in cache.batches(_eval_batch(cache), device=device):
            correct += int((scores(x).argmax(1).cpu() == y[idx]).sum())
    return correct / len(cache)


def softhebb_readout(
    train_x: Features,
    train_y: torch.Tensor,
    test_x: Features,
    test_y: torch.Tensor,
    epochs: int = SOFTHEBB_EPOCHS,
    lr: float = SOFTHEBB_LR,
    batch_size: int = SOFTHEBB_BATCH_SIZE,
    dropout: float = SOFTHEBB_DROPOUT,
    num_classes: Optional[int] = None,
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    num_threads: Optional[int] = None,
) -> ProbeResult:
    """SoftHebb's readout (Journe et al. 2023; see the module docstring for each constant's source):
    Dropout(0.5) and one Linear layer on the raw features, cross-entropy, Adam(lr 1e-3), batches of 64
    reshuffled every epoch, 50 epochs, the learning rate halved after epochs 10, 17, 25, 30, 35, 40, 45.

    Features are [N, D] tensors or :class:`FeatureCache` (float16 storage is fine: batches are computed in
    float32 on ``device``, default CPU). ``seed`` fixes the initialisation, the order and the dropout masks.
    ``num_threads``: torch's CPU threads during the fit (restored afterwards; None leaves them): on a
    machine whose cores are busy, 1 thread is several times faster than 2. Returns the final model's train
    and test accuracy (fractions; train accuracy without dropout).
    """
    train, test = as_cache(train_x), as_cache(test_x)
    _check(train, test)
    ytr, yte = _labels(train_y, len(train), "train"), _labels(test_y, len(test), "test")
    k = _num_classes(num_classes, ytr, yte)
    if not isinstance(epochs, int) or epochs < 1 or not 0 <= dropout < 1 or not lr > 0:
        raise ValueError(f"need an int epochs >= 1, 0 <= dropout < 1 and lr > 0, got epochs={epochs!r}, dropout={dropout}, lr={lr}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        return _fit_softhebb(train, ytr, test, yte, k, epochs, lr, batch_size, dropout, seed, device)
    finally:
        torch.set_num_threads(threads)


def _fit_softhebb(train, ytr, test, yte, k, epochs, lr, batch_size, dropout, seed, device) -> ProbeResult:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        linear = nn.Linear(train.dim, k).to(device)
        opt = torch.optim.Adam(linear.parameters(), lr=lr, **({"fused": True} if device.type == "cpu" else {}))
        sched = softhebb_scheduler(opt, epochs)
        rng = torch.Generator().manual_seed(seed)  # batch order, and the dropout masks on the CPU
        labels = ytr.to(device)
        for _ in range(epochs):
            for idx, x in train.batches(batch_size, shuffle=True, generator=rng, device=device):
                loss = nn.functional.cross_entropy(linear(fast_dropout(x, dropout, rng)), labels[idx.to(device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    return ProbeResult(_accuracy(linear, train, ytr, device), _accuracy(linear, test, yte, device), None)


# the 8 bits of each byte value as dropout scales for p = 0.5: 0 (dropped) or 2 = 1 / (1 - p) (kept)
_BYTE_SCALES = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).float() * 2


def fast_dropout(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Inverted dropout, as ``nn.functional.dropout`` in training mode: each value of ``x`` zeroed with
    probability p, the others scaled by 1 / (1 - p); ``x`` itself is not changed. For p = 0.5 on the CPU
    the mask is the bits of random bytes from ``generator`` (8 values per draw, looked up in a table:
    several times faster than torch.bernoulli); otherwise nn.functional.dropout with torch's generator."""
    if p == 0:
        return x
    if p != 0.5 or x.device.type != "cpu" or x.dtype != torch.float32:
        return nn.functional.dropout(x, p, training=True)
    n = x.numel()
    draws = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.int64, generator=generator)
    return x * _BYTE_SCALES.index_select(0, draws).view(-1)[:n].view(x.shape)


def miconi_ridge(
    train_x: Features, train_y: torch.Tensor, alpha: float = MICONI_ALPHA, num_classes: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight [D, K] and bias [K] (float64) of ridge regression of one-hot labels on the raw features, as
    ``sklearn.linear_model.Ridge(alpha)`` fits them (Miconi 2021): W = (Xc^T Xc + alpha I)^-1 Xc^T Yc with
    Xc, Yc the centred features and labels (the intercept is not penalised), b = mean(Y) - mean(X) W.
    The sums are streamed over the features in float64."""
    train = as_cache(train_x)
    ytr = _labels(train_y, len(train), "train")
    k = _num_classes(num_classes, ytr)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    acc = RidgeAccumulator(train.dim, k)
    for idx, x in train.batches(_eval_batch(train), dtype=torch.float64):
        acc.update(x, ytr[idx])
    n = acc.n
    mean_x, mean_y = acc.sum_x / n, acc.sum_y / n
    gram = acc.xtx - n * torch.outer(mean_x, mean_x)
    gram.diagonal().add_(alpha)
    weight = torch.linalg.solve(gram, acc.xty - n * torch.outer(mean_x, mean_y))
    return weight, mean_y - mean_x @ weight


def miconi_readout(
    train_x: Features,
    train_y: torch.Tensor,
    test_x: Features,
    test_y: torch.Tensor,
    alpha: float = MICONI_ALPHA,
    num_classes: Optional[int] = None,
    seed: int = 0,
) -> ProbeResult:
    """Miconi 2021's readout: :func:`miconi_ridge` (``sklearn.linear_model.Ridge()``, alpha = 1, on the raw
    features and one-hot labels), predicting the argmax of x W + b. ``seed`` is accepted so that every
    readout has the same call; the fit is deterministic."""
    del seed
    train, test = as_cache(train_x), as_cache(test_x)
    _check(train, test)
    ytr, yte = _labels(train_y, len(train), "train"), _labels(test_y, len(test), "test")
    k = _num_classes(num_classes, ytr, yte)
    weight, bias = miconi_ridge(train, ytr, alpha, k)
    scores = lambda x: x.double() @ weight + bias  # noqa: E731
    return ProbeResult(_accuracy(scores, train, ytr, None), _accuracy(scores, test, yte, None), float(alpha))


# --------------------------------------------------------------------------- the papers' readouts by name
def _softhebb_layers(model: nn.Module) -> List[str]:
    names = list(getattr(model, "feature_layers", ()))
    if not names:
        raise ValueError(f"{type(model).__name__} has no feature_layers; SoftHebb's readout reads each block's "
                         "output (hebbloss.models.softhebb gives pool1, pool2, ...): pass layers explicitly")
    return names


def _miconi_layers(model: nn.Module) -> List[str]:
    blocks = list(getattr(model, "feature_layers", ()))
    modules = dict(model.named_modules())
    names = [f"norm{i + 2}" for i in range(len(blocks) - 1)] + blocks[-1:]
    missing = [n for n in names if n not in modules]
    if not blocks or missing:
        raise ValueError(f"{type(model).__name__} lacks {missing or 'feature_layers'}; Miconi's readout reads layer l "
                         "after the per-sample standardisation of layer l+1 (hebbloss.models.miconi2021's norm2, norm3) "
                         "and the last layer's pooled output: pass layers explicitly")
    return names


@dataclass(frozen=True)
class PaperReadout:
    """One paper's readout: which module gives the features of each block, how they are pooled
    (for :func:`hebbloss.probe.features.iter_features`), and the classifier ``fit(train_x, train_y,
    test_x, test_y, seed=..., **options) -> ProbeResult``."""

    name: str
    paper: str
    pool: Pool
    fit: Callable[..., ProbeResult]
    block_layers: Callable[[nn.Module], List[str]]

    def layers(self, model: nn.Module) -> Dict[int, str]:
        """Block number (1..N) -> the module whose output this readout reads for that block."""
        return {i + 1: name for i, name in enumerate(self.block_layers(model))}


READOUTS: Dict[str, PaperReadout] = {
    "softhebb": PaperReadout("softhebb", SOFTHEBB_PAPER, "flatten", softhebb_readout, _softhebb_layers),
    "miconi": PaperReadout("miconi", MICONI_PAPER, "quadrants", miconi_readout, _miconi_layers),
}
_MODEL_PREFIXES = {"softhebb": "softhebb", "miconi": "miconi"}  # model name prefix -> readout


def paper_readout_for(model: Union[str, nn.Module]) -> PaperReadout:
    """The readout of the paper a model comes from, by model name ("softhebb", "softhebb-cifar10", ...
    give SoftHebb's, "miconi2021" Miconi's) or by a model's ``recipe.name`` (hebbloss.models networks).
    ValueError naming the known readouts otherwise."""
    name = model if isinstance(model, str) else getattr(getattr(model, "recipe", None), "name", type(model).__name__)
    key = str(name).lower()
    for prefix, readout in _MODEL_PREFIXES.items():
        if key.startswith(prefix):
            return READOUTS[readout]
    raise ValueError(f"no paper readout is known for model {name!r}; known: models named softhebb* "
                     f"(SoftHebb's readout) and miconi* (Miconi's); or choose one of {sorted(READOUTS)} by name")


def evaluate_paper_readout(
    model: nn.Module,
    readout: Union[str, PaperReadout],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    layers: Optional[Sequence[str]] = None,
    batch_size: int = 256,
    device: Optional[Union[str, torch.device]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    memory_limit: Optional[float] = None,
    folder: Optional[PathLike] = None,
    seed: int = 0,
    **options,
) -> Dict[str, ProbeResult]:
    """Each layer's accuracy under a paper's readout (a :data:`READOUTS` name, or a model name such as
    "softhebb" / "miconi2021" resolved by :func:`paper_readout_for`): the features of the frozen ``model``
    are computed once per image set (float16 :class:`FeatureCache`, float32 where a feature exceeds float16's
    range, in memory or under ``folder``) and the readout is fitted on them; ``options`` go to the readout
    (e.g. epochs=..., device=...).
    ``layers`` defaults to the readout's layers for each block (:meth:`PaperReadout.layers`)."""
    spec = readout if isinstance(readout, PaperReadout) else READOUTS.get(readout) or paper_readout_for(readout)
    names = list(layers) if layers is not None else list(spec.layers(model).values())
    folders = [None if folder is None else f"{folder}/{part}" for part in ("train", "test")]
    train, test = cache_feature_sets(model, names, [train_images, test_images], folders, memory_limit=memory_limit,
                                     batch_size=batch_size, pool=spec.pool, device=device, mean=mean, std=std)
    return {n: spec.fit(train[n], train_labels, test[n], test_labels, seed=seed, **options) for n in names}
