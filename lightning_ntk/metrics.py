"""How faithfully a surrogate reproduces a network: Kendall-τ (:class:`KendallTau`) and, with it, the
accuracy differential, agreement and the overlap of their mistakes (:class:`SurrogateFidelity`), as
``torchmetrics.Metric`` subclasses that reduce correctly under DDP.

Scores are kept as cat-states (gathered across ranks) because τ is not a sum over examples; the
counts behind the accuracies are sum-states.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .errors import LabelError

SCORES = ("true_class", "predicted_class", "logits")


def _tie_pairs(sorted_values: np.ndarray) -> float:
    """Σ t(t−1)/2 over the runs of equal values in a sorted array."""
    if len(sorted_values) == 0:
        return 0.0
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    runs = np.diff(np.concatenate(([0], boundaries, [len(sorted_values)]))).astype(np.float64)
    return float((runs * (runs - 1) / 2).sum())


def _count_inversions(ranks: np.ndarray) -> int:
    """Pairs ``i < j`` with ``ranks[i] > ranks[j]`` for integer ranks in ``[0, n)``, by a vectorised
    bottom-up merge sort: at each level every run is sorted, so one ``searchsorted`` per level counts,
    for each element of a right run, the elements of its left run above it. O(n log² n) in numpy."""
    n = len(ranks)
    size = 1 << max(0, (n - 1).bit_length())
    a = np.full(size, n, dtype=np.int64)  # padding sorts last and adds no inversion
    a[:n] = ranks
    span = n + 1  # offsetting pair i by i·span keeps all runs in one globally sorted array
    inversions, width = 0, 1
    while width < size:
        pairs = a.reshape(-1, 2, width)
        first = np.arange(len(pairs))[:, None]
        left = (pairs[:, 0] + first * span).ravel()
        right = (pairs[:, 1] + first * span).ravel()
        not_above = np.searchsorted(left, right, side="right").reshape(-1, width) - first * width
        inversions += int((width - not_above).sum())
        a = np.sort(pairs.reshape(-1, 2 * width), axis=1).ravel()
        width *= 2
    return inversions


def kendall_tau_b(x, y) -> float:
    """Kendall's τ-b with ties (Knight's O(n log n) algorithm; equals ``scipy.stats.kendalltau``).

    NaN when fewer than two points or when either side is constant.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"Kendall τ needs two score vectors of equal length, got {x.shape} and {y.shape}.")
    n = len(x)
    if n < 2:
        return math.nan
    order = np.lexsort((y, x))  # by x, ties in x broken by y
    x, y = x[order], y[order]
    pairs = n * (n - 1) / 2
    x_ties = _tie_pairs(x)
    joint_boundaries = np.flatnonzero((np.diff(x) != 0) | (np.diff(y) != 0)) + 1
    joint_runs = np.diff(np.concatenate(([0], joint_boundaries, [n]))).astype(np.float64)
    joint_ties = float((joint_runs * (joint_runs - 1) / 2).sum())
    discordant = _count_inversions(np.unique(y, return_inverse=True)[1])
    y_ties = _tie_pairs(np.sort(y))
    denominator = math.sqrt((pairs - x_ties) * (pairs - y_ties))
    if denominator == 0:
        return math.nan
    return (pairs - x_ties - y_ties + joint_ties - 2 * discordant) / denominator


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """Predicted classes ``[M]``: the argmax, or ``logit > 0`` for a single logit."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``[M, C]``; a single logit becomes ``[1 − σ, σ]``."""
    logits = logits.double()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def check_label_range(labels: torch.Tensor, num_logits: int, what: str = "The labels", fix: str = "") -> None:
    """Refuse labels outside the classes of a network with ``num_logits`` logits (two for a single logit)."""
    classes = max(2, num_logits)
    if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
        raise LabelError(
            f"{what} hold labels {int(labels.min())}..{int(labels.max())}, outside the {classes} classes of the network's "
            f"{num_logits} logit(s). {fix or 'Check that the data use the training classes, or the model its output size.'}"
        )


def _check_inputs(network_logits: torch.Tensor, surrogate_logits: torch.Tensor, labels: torch.Tensor) -> None:
    if network_logits.ndim != 2 or network_logits.shape != surrogate_logits.shape:
        raise ValueError(
            f"Network logits {tuple(network_logits.shape)} and surrogate logits {tuple(surrogate_logits.shape)} must both "
            "be [M, C] with the same shape: fit the surrogate with num_outputs equal to the network's number of logits."
        )
    if labels.ndim != 1 or labels.shape[0] != network_logits.shape[0]:
        raise LabelError(f"Expected one label per example ({network_logits.shape[0]}), got labels of shape {tuple(labels.shape)}.")
    check_label_range(labels, network_logits.shape[1], fix="Check that the query set uses the training set's classes.")


def _per_distinct_row(fn, rows: torch.Tensor) -> torch.Tensor:
    """``fn`` applied once to each distinct row of ``rows``, in sorted order: equal rows get bit-equal
    results wherever they stand. (Elementwise kernels take other code paths in a vector's tail, so the same
    logits give results one ulp apart by position, which would turn ties into ordered pairs and make τ
    depend on how examples were batched, merged or sharded.)"""
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    return fn(distinct)[inverse]


def _class_probability(rows: torch.Tensor) -> torch.Tensor:
    """Rows of logits followed by a class index: the probability of that class."""
    return _probabilities(rows[:, :-1]).gather(1, rows[:, -1:].long())[:, 0]


def fidelity_scores(network_logits: torch.Tensor, surrogate_logits: torch.Tensor, labels: torch.Tensor, score: str = "true_class"):
    """The paired scores that Kendall-τ ranks, with saturated network scores (p exactly 0 or 1) dropped.

    ``true_class``: each model's probability of the true class (the sigmoid output for a single logit,
    as in the paper); ``predicted_class``: each model's probability of the network's predicted class;
    ``logits``: all logits, flattened. Equal logits (and class) give equal scores, whatever their position.
    """
    if score not in SCORES:
        raise ValueError(f"Unknown score {score!r}; choose one of {SCORES}.")
    _check_inputs(network_logits, surrogate_logits, labels)
    if score == "logits":
        return network_logits.double().flatten(), surrogate_logits.double().flatten()
    if network_logits.shape[1] == 1 and score == "true_class":
        column = torch.ones_like(labels)  # the sigmoid output: the probability of class 1
    else:
        column = labels if score == "true_class" else predictions(network_logits)
    column = column.double().unsqueeze(1)
    net, sur = (_per_distinct_row(_class_probability, torch.cat([logits.double(), column], 1)) for logits in (network_logits, surrogate_logits))
    keep = (net > 0) & (net < 1)
    return net[keep], sur[keep]


class KendallTau(Metric):
    """Kendall τ-b between the network's and the surrogate's scores (see :func:`fidelity_scores`).

    The states are the logits and labels themselves, and the scores are computed from all of them at once,
    so that τ does not depend on how the examples were split into updates or over processes."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, score: str = "true_class", **kwargs):
        super().__init__(**kwargs)
        if score not in SCORES:
            raise ValueError(f"Unknown score {score!r}; choose one of {SCORES}.")
        self.score = score
        self.add_state("network_logits", default=[], dist_reduce_fx="cat")
        self.add_state("surrogate_logits", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, network_logits: torch.Tensor, surrogate_logits: torch.Tensor, labels: torch.Tensor) -> None:
        _check_inputs(network_logits, surrogate_logits, labels)
        self.network_logits.append(network_logits.double())
        self.surrogate_logits.append(surrogate_logits.double())
        self.labels.append(labels.long())

    def compute(self) -> torch.Tensor:
        net, sur = fidelity_scores(*(dim_zero_cat(state) for state in (self.network_logits, self.surrogate_logits, self.labels)), self.score)
        return torch.tensor(kendall_tau_b(net.cpu().numpy(), sur.cpu().numpy()), dtype=torch.float64)


def binomial_survival(k: int, n: int, p: float) -> float:
    """``P(X ≥ k)`` for ``X ~ Binomial(n, p)``, summed in log space."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    j = torch.arange(k, n + 1, dtype=torch.float64)
    log_terms = (
        math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1) + j * math.log(p) + (n - j) * math.log1p(-p)
    )
    return float(torch.logsumexp(log_terms, 0).exp().clamp(max=1.0))


_COUNTS = ("total", "network_correct", "surrogate_correct", "agree", "both_miss", "either_miss")


def _add_count_states(metric: Metric) -> None:
    for name in _COUNTS:
        metric.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")


def _update_counts(metric: Metric, network_logits: torch.Tensor, surrogate_logits: torch.Tensor, labels: torch.Tensor) -> None:
    labels = labels.long()
    network_pred, surrogate_pred = predictions(network_logits), predictions(surrogate_logits)
    network_miss, surrogate_miss = network_pred != labels, surrogate_pred != labels
    metric.total += labels.numel()
    metric.network_correct += (~network_miss).sum()
    metric.surrogate_correct += (~surrogate_miss).sum()
    metric.agree += (network_pred == surrogate_pred).sum()
    metric.both_miss += (network_miss & surrogate_miss).sum()
    metric.either_miss += (network_miss | surrogate_miss).sum()


def _count_figures(metric: Metric) -> dict[str, torch.Tensor]:
    """Accuracies, their differential, agreement and the misclassification overlap with its binomial
    null p-value (see :class:`SurrogateFidelity`)."""
    total = int(metric.total)
    if total == 0:
        raise ValueError(f"{type(metric).__name__}.compute() was called before any update: no examples were seen.")
    network_acc = metric.network_correct.double() / total
    surrogate_acc = metric.surrogate_correct.double() / total
    both, either = int(metric.both_miss), int(metric.either_miss)
    shared_miss_rate = float((1 - network_acc) * (1 - surrogate_acc))
    return {
        "tad": surrogate_acc - network_acc,
        "agreement": metric.agree.double() / total,
        "surrogate_acc": surrogate_acc,
        "network_acc": network_acc,
        "miss_overlap": torch.tensor(both / either if either else math.nan, dtype=torch.float64),
        "miss_overlap_p": torch.tensor(binomial_survival(both, total, shared_miss_rate), dtype=torch.float64),
    }


class SurrogateFidelity(KendallTau):
    """All fidelity figures at once, as a dict with stable names:

    - ``kendall_tau``: τ-b of the two models' scores (:class:`KendallTau`, same ``score`` option);
    - ``network_acc``, ``surrogate_acc`` and ``tad`` = surrogate − network accuracy (fractions);
    - ``agreement``: fraction of examples where both predict the same class;
    - ``miss_overlap``: ``|miss_NN ∩ miss_S| / |miss_NN ∪ miss_S|`` (NaN when neither model errs);
    - ``miss_overlap_p``: the probability of at least that many shared misses if the two models erred
      independently, each at its own observed error rate ``e_NN``, ``e_S``: then each of the n examples
      is missed by both with probability ``e_NN·e_S``, and the number of shared misses is
      ``Binomial(n, e_NN·e_S)``. Small values mean the surrogate fails where the network fails.
    """

    higher_is_better = None

    def __init__(self, score: str = "true_class", **kwargs):
        super().__init__(score, **kwargs)
        _add_count_states(self)

    def update(self, network_logits: torch.Tensor, surrogate_logits: torch.Tensor, labels: torch.Tensor) -> None:
        super().update(network_logits, surrogate_logits, labels)
        _update_counts(self, network_logits, surrogate_logits, labels)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"kendall_tau": super().compute(), **_count_figures(self)}
