"""Closed-form ridge regression on one-hot targets as a linear probe, streamed via X^T X and X^T Y.

Features are standardised with the training mean and (population) standard deviation, then
    W = (Z^T Z / n + alpha I)^-1 Z^T (Y - mean(Y)) / n,   b = mean(Y),
the minimiser of ||Z W + b - Y||^2 / n + alpha ||W||^2 (Hoerl & Kennard 1970). Every quantity comes from
the running sums n, sum x, X^T X, X^T Y, sum y and Y^T Y, so X is never held whole; the same sums of a
held-out part give its squared error, so alpha is chosen without storing that part either.

Laid out as torchmetrics does: pure functions of the sums (:class:`RidgeStats`) compute the solution for an
alpha, a squared error and the choice of alpha (:func:`choose_alpha`); :class:`RidgeAccumulator` only holds
the sums (``update``, ``+=``) and :class:`RidgeSweep` the fitted and held-out parts of one probe. Both
:func:`fit_ridge` (features in memory) and the streamed probe of :func:`hebbloss.probe.evaluate` use them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .result import ProbeResult

DEFAULT_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
MAX_FEATURES = 8192  # X^T X in float64 is 512 MiB at this size


@dataclass
class RidgeSolution:
    """A fitted readout in the raw feature space: scores = x @ weight + bias."""

    weight: torch.Tensor  # [D, K]
    bias: torch.Tensor  # [K]
    alpha: float

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight + bias, [N, K]."""
        return x.to(self.weight) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The class of highest score, [N]."""
        return self.scores(x).argmax(dim=1)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, num_classes] one-hot codes of class indices ``labels`` [N]; ValueError for indices out of range."""
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-d tensor of class indices, got shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels span {int(labels.min())}..{int(labels.max())}, outside 0..{num_classes - 1}")
    return torch.nn.functional.one_hot(labels.long(), num_classes)


class RidgeStats(NamedTuple):
    """The sums a ridge readout is computed from: n, sum x [D], X^T X [D, D], X^T Y [D, K], sum y [K], Y^T Y."""

    n: int
    sum_x: torch.Tensor
    xtx: torch.Tensor
    xty: torch.Tensor
    sum_y: torch.Tensor
    yty: torch.Tensor


# ----------------------------------------------------------------------------------------------- functional core
def candidate_alphas(alpha: Optional[Union[float, Sequence[float]]]) -> List[float]:
    """The penalties to try: :data:`DEFAULT_ALPHAS` for None, else ``alpha`` as a list of positive floats."""
    if alpha is None:
        return list(DEFAULT_ALPHAS)
    if isinstance(alpha, (int, float)):
        return [float(alpha)]
    values = [float(a) for a in alpha]
    if not values or not all(a > 0 for a in values):
        raise ValueError(f"alpha must be a positive number or a non-empty list of them, got {alpha!r}")
    return values


def split_mask(n: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """A fixed random boolean mask marking round(fraction * n) (at least 1) of n samples as held out."""
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=g)[: max(1, round(fraction * n))]] = True
    return held


def held_out_mask(n: int, alphas: Sequence[float], fraction: float, seed: int = 0) -> torch.Tensor:
    """The samples held out to choose among ``alphas``: :func:`split_mask`, or none when there is one alpha."""
    return split_mask(n, fraction, seed) if len(alphas) > 1 else torch.zeros(n, dtype=torch.bool)


def standardisation(stats: RidgeStats) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and population standard deviation of each feature (1 where a feature is constant)."""
    if stats.n < 2:
        raise ValueError(f"ridge needs at least 2 training samples, got {stats.n}")
    mean = stats.sum_x / stats.n
    var = (stats.xtx.diagonal() / stats.n - mean * mean).clamp_min(0)
    std = var.sqrt()
    return mean, torch.where(std > 1e-6 * std.max().clamp_min(1e-30), std, torch.ones_like(std))


def normal_equations(stats: RidgeStats) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean, std, Z^T Z / n and Z^T (Y - mean Y) / n of the standardised features Z (new tensors)."""
    mean, std = standardisation(stats)
    n = stats.n
    cov = (stats.xtx - n * torch.outer(mean, mean)) / torch.outer(std, std) / n
    cxy = (stats.xty - n * torch.outer(mean, stats.sum_y / n)) / std[:, None] / n
    return mean, std, cov, cxy


def _raw_solution(stats: RidgeStats, w_z, mean, std, alpha) -> RidgeSolution:
    """The readout of standardised features ``w_z`` expressed on the raw features."""
    weight = w_z / std[:, None]
    return RidgeSolution(weight, stats.sum_y / stats.n - mean @ weight, float(alpha))


def ridge_solution(stats: RidgeStats, alpha: float) -> RidgeSolution:
    """The ridge readout of the samples summed in ``stats`` with penalty ``alpha`` (see the module docstring)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    mean, std, cov, cxy = normal_equations(stats)
    cov.diagonal().add_(alpha)
    return _raw_solution(stats, torch.linalg.solve(cov, cxy), mean, std, alpha)


def ridge_solutions(stats: RidgeStats, alphas: Sequence[float]) -> List[RidgeSolution]:
    """:func:`ridge_solution` for several penalties from one eigendecomposition of Z^T Z / n."""
    if not all(a > 0 for a in alphas):
        raise ValueError(f"alphas must be positive, got {list(alphas)}")
    mean, std, cov, cxy = normal_equations(stats)
    eigval, eigvec = torch.linalg.eigh(cov)
    proj = eigvec.T @ cxy
    return [_raw_solution(stats, eigvec @ (proj / (eigval.clamp_min(0) + a)[:, None]), mean, std, a) for a in alphas]


def squared_error(stats: RidgeStats, sol: RidgeSolution) -> float:
    """Mean over the samples summed in ``stats`` of ||x W + b - y||^2, from the sums alone."""
    w, b = sol.weight.to(stats.xtx), sol.bias.to(stats.xtx)
    total = (
        (w * (stats.xtx @ w)).sum() + 2 * (stats.sum_x @ w) @ b + stats.n * (b @ b)
        - 2 * (w * stats.xty).sum() - 2 * (b @ stats.sum_y) + stats.yty
    )
    return float(total / max(stats.n, 1))


def choose_alpha(fit: RidgeStats, held: Optional[RidgeStats], alphas: Sequence[float]) -> float:
    """The alpha whose readout fitted on ``fit`` has the lowest squared error on ``held`` (the only one when
    ``alphas`` has one value; ``held`` may then be None). Pure: neither sum is changed."""
    if len(alphas) == 1:
        return alphas[0]
    if held is None:
        raise ValueError(f"choosing among alphas {list(alphas)} needs held-out samples")
    errors = [squared_error(held, sol) for sol in ridge_solutions(fit, alphas)]
    return alphas[min(range(len(alphas)), key=errors.__getitem__)]


# ----------------------------------------------------------------------------------------------- accumulators
class RidgeAccumulator:
    """Accumulates n, sum x, X^T X, X^T Y, sum y and Y^T Y batch by batch (float64 by default), so the
    ridge readout of any number of samples needs O(D^2) memory; ``a += b`` pools two accumulators."""

    def __init__(self, num_features: int, num_classes: int, dtype=torch.float64, device=None):
        if num_features > MAX_FEATURES:
            raise ValueError(
                f"{num_features} features need a {num_features}x{num_features} X^T X ({num_features ** 2 * 8 / 2 ** 30:.0f} GiB "
                f"in float64); pool the layer (pool='quadrants', 'global' or a small grid) to at most {MAX_FEATURES}"
            )
        self.num_features, self.num_classes = num_features, num_classes
        kw = dict(dtype=dtype, device=device)
        self.n = 0
        self.sum_x = torch.zeros(num_features, **kw)
        self.xtx = torch.zeros(num_features, num_features, **kw)
        self.xty = torch.zeros(num_features, num_classes, **kw)
        self.sum_y = torch.zeros(num_classes, **kw)
        self.yty = torch.zeros((), **kw)

    @property
    def stats(self) -> RidgeStats:
        """The sums so far (views, not copies) for the functions above."""
        return RidgeStats(self.n, self.sum_x, self.xtx, self.xty, self.sum_y, self.yty)

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> "RidgeAccumulator":
        """Add the samples ``x`` [B, D] with class indices ``labels`` [B]."""
        if x.dim() != 2 or x.shape[1] != self.num_features or x.shape[0] != labels.shape[0]:
            raise ValueError(f"expected x [B, {self.num_features}] and B labels, got x {tuple(x.shape)} and {tuple(labels.shape)} labels")
        x = x.to(self.xtx)
        y = one_hot(labels.to(x.device), self.num_classes).to(x)
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.xtx.addmm_(x.T, x)
        self.xty.addmm_(x.T, y)
        self.sum_y += y.sum(0)
        self.yty += (y * y).sum()
        return self

    def __iadd__(self, other: "RidgeAccumulator") -> "RidgeAccumulator":
        """Pool ``other``'s samples into this accumulator, in place (no extra D x D copy)."""
        self.n += other.n
        for k in ("sum_x", "xtx", "xty", "sum_y", "yty"):
            getattr(self, k).add_(getattr(other, k))
        return self

    def standardisation(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """:func:`standardisation` of the accumulated samples."""
        return standardisation(self.stats)

    def solve(self, alpha: float) -> RidgeSolution:
        """:func:`ridge_solution` of the accumulated samples."""
        return ridge_solution(self.stats, alpha)

    def solve_many(self, alphas: Sequence[float]) -> List[RidgeSolution]:
        """:func:`ridge_solutions` of the accumulated samples."""
        return ridge_solutions(self.stats, alphas)

    def squared_error(self, sol: RidgeSolution) -> float:
        """:func:`squared_error` of ``sol`` on the accumulated samples."""
        return squared_error(self.stats, sol)


class RidgeSweep:
    """The training samples of one ridge probe, batch by batch: a part fitted and a part held out to choose
    alpha (none when there is one alpha); :meth:`solve` chooses with :func:`choose_alpha` and refits on all."""

    def __init__(self, num_features: int, num_classes: int, alphas: Sequence[float], device=None):
        self.alphas = list(alphas)
        self.fit = RidgeAccumulator(num_features, num_classes, device=device)
        self.held = RidgeAccumulator(num_features, num_classes, device=device) if len(self.alphas) > 1 else None

    def update(self, x: torch.Tensor, labels: torch.Tensor, held: torch.Tensor) -> "RidgeSweep":
        """Add the samples ``x`` [B, D] with ``labels`` [B]; ``held`` [B] (bool, on the CPU) marks the held-out ones."""
        held_dev = held.to(x.device)
        self.fit.update(x[~held_dev], labels[~held])
        if self.held is not None:
            self.held.update(x[held_dev], labels[held])
        return self

    def solve(self) -> RidgeSolution:
        """The readout with the chosen alpha, fitted on every sample (the held-out part is pooled in, in place)."""
        chosen = choose_alpha(self.fit.stats, None if self.held is None else self.held.stats, self.alphas)
        if self.held is not None:
            self.fit += self.held
            self.held = None
        return self.fit.solve(chosen)


def accuracy(sol: RidgeSolution, x: torch.Tensor, labels: torch.Tensor, chunk: int = 8192) -> float:
    """The fraction of ``x`` [N, D] that ``sol`` classifies as ``labels``, ``chunk`` samples at a time (NaN if N = 0)."""
    if x.shape[0] == 0:
        return float("nan")
    correct = sum(int((sol.predict(x[i:i + chunk]).cpu() == labels[i:i + chunk].cpu()).sum()) for i in range(0, x.shape[0], chunk))
    return correct / x.shape[0]


def fit_ridge(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    alpha: Optional[Union[float, Sequence[float]]] = None,
    num_classes: Optional[int] = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    chunk: int = 8192,
) -> ProbeResult:
    """Train and test accuracy of a ridge readout of standardised features onto one-hot labels.

    ``alpha``: one value, or a list (None: :data:`DEFAULT_ALPHAS`) swept on a held-out ``val_fraction`` of
    the training set by squared error, the winner refitted on the whole training set. Computed in float64
    on the features' device, ``chunk`` samples at a time.
    """
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got train {tuple(train_x.shape)} and test {tuple(test_x.shape)}")
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0]:
        raise ValueError("features and labels differ in number of samples")
    alphas = candidate_alphas(alpha)
    k = num_classes if num_classes is not None else int(max(train_y.max(), test_y.max() if test_y.numel() else 0)) + 1
    n, d = train_x.shape
    held = held_out_mask(n, alphas, val_fraction, seed)
    sweep = RidgeSweep(d, k, alphas, device=train_x.device)
    for i in range(0, n, chunk):
        sweep.update(train_x[i:i + chunk], train_y[i:i + chunk], held[i:i + chunk])
    sol = sweep.solve()
    return ProbeResult(accuracy(sol, train_x, train_y, chunk), accuracy(sol, test_x, test_y, chunk), sol.alpha)
