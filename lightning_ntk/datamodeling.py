"""Do attributions predict what retraining would do? The linear datamodeling score, a retraining harness
and mislabel detection, measured the way the field measures them (Park et al. 2023, "TRAK").

An attribution score ``score(x, j)`` claims that training on example ``j`` moves the model's margin on ``x``
by that much. The linear datamodeling score (LDS) checks the claim on models actually retrained: train ``M``
models on random subsets ``S_m`` of the training set (half of it, by default), record each query's margin
on each, and for each query take the Spearman correlation over ``m`` between the margins and the predicted
``Σ_{j ∈ S_m} score(x, j)``. Two retrainings on the same subsets (other seeds) give the noise ceiling.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from .store import FeatureStore
from .task import Task, iter_batches, move_inputs


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[M]`` margins: the true class's logit minus the log-sum-exp of the others' (``log p/(1 − p)``); for a
    single logit ``z``, ``z`` for class 1 and ``−z`` for class 0."""
    logits, labels = torch.as_tensor(logits).double(), torch.as_tensor(labels).long()
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"margins needs [M, C] logits and [M] labels, got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    if logits.shape[1] == 1:
        return logits[:, 0] * (2 * labels - 1)
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], -math.inf).logsumexp(1)
    return true - others


def random_subsets(num_train: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``[num_subsets, num_train]`` boolean masks, each of ``round(fraction · num_train)`` examples drawn at
    random (seeded): the subsets to retrain on."""
    if not 0 < fraction < 1 or num_train < 2 or num_subsets < 1:
        raise ValueError(f"Need 0 < fraction < 1, num_train ≥ 2 and num_subsets ≥ 1, got {fraction}, {num_train} and {num_subsets}.")
    size = max(1, round(fraction * num_train))
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_subsets, num_train, dtype=torch.bool)
    for row in masks:
        row[torch.randperm(num_train, generator=generator)[:size]] = True
    return masks


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks down each column (average ranks for ties, as scipy's ``rankdata``)."""
    sorted_values, order = values.sort(0)
    rows, columns = values.shape
    new_group = torch.ones_like(sorted_values, dtype=torch.bool)
    new_group[1:] = sorted_values[1:] != sorted_values[:-1]
    group = new_group.cumsum(0) - 1 + torch.arange(columns) * rows  # a distinct id per run of ties, per column
    position = torch.arange(rows, dtype=torch.float64)[:, None].expand(rows, columns)
    total = torch.zeros(rows * columns, dtype=torch.float64).index_add_(0, group.flatten(), position.flatten())
    count = torch.zeros(rows * columns, dtype=torch.float64).index_add_(0, group.flatten(), torch.ones(rows * columns, dtype=torch.float64))
    average = (total / count.clamp_min(1))[group]
    return torch.empty_like(average).scatter_(0, order, average)


def spearman_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each column of ``a`` with the same column of ``b`` (NaN where either is
    constant)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    denominator = (ra.square().sum(0) * rb.square().sum(0)).sqrt()
    return torch.where(denominator > 0, (ra * rb).sum(0) / denominator, math.nan)


@dataclass(frozen=True)
class LDS:
    """The linear datamodeling score: ``per_query`` Spearman correlations, their ``mean`` and its standard
    error over the queries where it is defined."""

    per_query: torch.Tensor
    mean: float
    standard_error: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.standard_error:.3f}"


def _summary(per_query: torch.Tensor) -> LDS:
    defined = per_query[~per_query.isnan()]
    if defined.numel() == 0:
        raise ValueError("The LDS is undefined for every query: the margins or the predicted sums do not vary over the subsets.")
    error = float(defined.std() / math.sqrt(defined.numel())) if defined.numel() > 1 else math.nan
    return LDS(per_query, float(defined.mean()), error)


def linear_datamodeling_score(scores: Any, subsets: Any, retrained_margins: Any) -> LDS:
    """The LDS of attribution ``scores`` ``[Q, N]`` (queries × training examples) against the margins
    ``[M, Q]`` of models retrained on ``subsets`` (``[M, N]`` boolean masks, e.g. :func:`random_subsets`)."""
    scores, subsets, retrained = (torch.as_tensor(v) for v in (scores, subsets, retrained_margins))
    if scores.ndim != 2 or subsets.ndim != 2 or retrained.ndim != 2:
        raise ValueError(f"Expected scores [Q, N], subsets [M, N] and margins [M, Q]; got {tuple(scores.shape)}, {tuple(subsets.shape)} and {tuple(retrained.shape)}.")
    (q, n), m = scores.shape, subsets.shape[0]
    if subsets.shape[1] != n or retrained.shape != (m, q):
        raise ValueError(
            f"Shapes do not match: scores [Q={q}, N={n}], subsets {tuple(subsets.shape)} (want [M, {n}]), "
            f"margins {tuple(retrained.shape)} (want [{m}, {q}])."
        )
    predicted = subsets.double() @ scores.double().T  # [M, Q]: the sum of the scores of each subset's examples
    return _summary(spearman_columns(predicted, retrained.double()))


def noise_ceiling(margins_a: Any, margins_b: Any) -> LDS:
    """How well one retraining predicts another on the same subsets (other seeds): the Spearman correlation
    over subsets of two ``[M, Q]`` margin arrays, per query. No attribution can be expected to beat it."""
    return _summary(spearman_columns(torch.as_tensor(margins_a), torch.as_tensor(margins_b)))


def mislabel_auroc(suspicion: Any, flipped: Any) -> float:
    """The area under the ROC curve of ranking training examples by ``suspicion`` (higher: more likely
    mislabelled) against the boolean mask of the ones whose labels were flipped (ties count half)."""
    suspicion, flipped = torch.as_tensor(suspicion).double().flatten(), torch.as_tensor(flipped).bool().flatten()
    positives, negatives = int(flipped.sum()), int((~flipped).sum())
    if suspicion.shape != flipped.shape or positives == 0 or negatives == 0:
        raise ValueError("mislabel_auroc needs one score per example and both flipped and clean examples.")
    ranks = _ranks(suspicion[:, None])[:, 0] + 1
    return float((ranks[flipped].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def flip_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels`` with a random ``fraction`` of them changed to another class (seeded), and the mask of those."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels).long().clone()
    chosen = torch.randperm(len(labels), generator=generator)[: round(fraction * len(labels))]
    shift = torch.randint(1, num_classes, (len(chosen),), generator=generator)
    labels[chosen] = (labels[chosen] + shift) % num_classes
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    flipped[chosen] = True
    return labels, flipped


def _digest(*values: Any) -> str:
    h = hashlib.sha256()
    for value in values:
        h.update(np.ascontiguousarray(torch.as_tensor(value).cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


class Retraining:
    """Train a model on each of ``subsets`` and record its margins on a query set, as the LDS needs.

    ``train(dataset, seed)`` trains a fresh model on a ``Dataset`` (the subset's examples) and returns it: a
    plain PyTorch loop, or :func:`lightning_training` for a ``LightningModule`` under a ``Trainer``.
    ``dataset`` holds the training examples (``subsets`` index it); ``query`` is ``(inputs, labels)``: the
    margins are read from the model's logits on ``inputs`` in eval mode.

    With ``folder``, each retraining's margins and logits are kept in a :class:`FeatureStore` there as they
    finish, and a later call with the same subsets, seeds, query and ``name`` reads them back instead of
    training again: an interrupted run resumes where it stopped. ``name`` should change when the model or
    its training does (the store cannot see the code).
    """

    def __init__(self, train: Callable[[Dataset, int], nn.Module], dataset: Dataset, query: tuple[Any, torch.Tensor],
                 folder: str | Path | None = None, name: str = "retraining", task: Task | None = None, batch_size: int = 256):
        self.train, self.dataset, self.name = train, dataset, name
        self.query_inputs, self.query_labels = query[0], torch.as_tensor(query[1]).long()
        self.store = FeatureStore(folder) if folder is not None else None
        self.task, self.batch_size = task or Task(), batch_size

    def logits(self, model: nn.Module) -> torch.Tensor:
        """The model's logits on the query inputs, in eval mode."""
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            parts = [self.task.forward(model, move_inputs(batch, device)).detach().cpu() for batch in iter_batches(self.query_inputs, self.batch_size)]
        return torch.cat(parts).float()

    def margins(self, subsets: torch.Tensor, seeds: Any = None, progress: bool = True) -> torch.Tensor:
        """``[M, Q]`` margins of models trained on each subset (``[M, N]`` boolean masks), the ``m``-th with
        seed ``seeds[m]`` (default: ``m``)."""
        subsets = torch.as_tensor(subsets).bool()
        if subsets.ndim != 2 or subsets.shape[1] != len(self.dataset):
            raise ValueError(f"subsets must be [M, {len(self.dataset)}] boolean masks over the training set, got {tuple(subsets.shape)}.")
        seeds = list(range(len(subsets))) if seeds is None else [int(s) for s in seeds]
        query = _digest(self.query_labels, *tree_flatten(self.query_inputs)[0])
        rows = []
        for mask, seed in tqdm(list(zip(subsets, seeds)), desc=f"retraining ({self.name})", disable=not progress, leave=False):
            request = {"name": self.name, "subset": _digest(mask), "seed": seed, "query": query}
            entry = f"{self.name}-{request['subset']}-seed{seed}-{query}"  # other subsets, seeds or queries live side by side
            stored = self.store.load(entry, request) if self.store is not None else None
            if stored is None:
                logits = self.logits(self.train(Subset(self.dataset, mask.nonzero()[:, 0].tolist()), seed))
                arrays = {"logits": logits, "margins": margins(logits, self.query_labels)}
                stored = self.store.save(entry, request, arrays) if self.store is not None else arrays
            rows.append(torch.as_tensor(np.asarray(stored["margins"])))
        return torch.stack(rows)


def lightning_training(make_module: Callable[[], Any], batch_size: int = 64, **trainer_options: Any) -> Callable[[Dataset, int], nn.Module]:
    """A ``train(dataset, seed)`` for :class:`Retraining` that fits ``make_module()`` (a ``LightningModule``)
    with a quiet ``Trainer`` (no logger, checkpoints, progress bar or summary unless ``trainer_options`` say
    otherwise) on shuffled batches of the dataset, seeded with ``seed``."""
    import lightning as L
    from torch.utils.data import DataLoader

    options = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
               "accelerator": "cpu", "devices": 1, **trainer_options}

    def train(dataset: Dataset, seed: int) -> nn.Module:
        L.seed_everything(seed, verbose=False)
        module = make_module()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
        banners = logging.getLogger("lightning.pytorch")  # "GPU available: ..." at every one of the M trainers
        level = banners.level
        banners.setLevel(max(level, logging.WARNING))
        try:
            L.Trainer(**options).fit(module, loader)
        finally:
            banners.setLevel(level)
        return module

    return train
