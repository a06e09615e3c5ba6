"""Which training examples explain a prediction: the surrogate's logit decomposes exactly over them,
``logit_c(x) = Σ_j W[c, j]·κ(x, x_j) + b_c``.

Contributions are computed block by block over the training set with a running top-k, so memory is
``O(M·block_size)`` and an ``M × N_train`` matrix exists only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .featurize import FeatureSpec
from .kernels import DEFAULT_BLOCK_SIZE
from .metrics import predictions
from .surrogate import KernelSurrogate

TopK = tuple[torch.Tensor, torch.Tensor]  # (values, indices), each [M, k]


@dataclass
class Attribution:
    """Top-k training points for each of ``M`` queries; indices are positions in the training set the
    surrogate was fitted on.

    - ``target`` ``[M]``: the class explained; ``logits`` ``[M, C_out]``: the surrogate's logits.
    - ``proponent_*``: the largest contributions ``W[target, j]·κ(x, x_j)``; ``opponent_*``: the most
      negative ones; ``similar_*``: the largest raw kernel values ``κ(x, x_j)``.
    - ``contributions`` ``[M, N_train]``: every contribution, only with ``return_contributions=True``.
      They sum with the bias ``b[target]`` to the target's logit.

    For a single-logit surrogate the explained logit is ``z`` for class 1 and ``−z`` for class 0, so
    contributions (and the bias) are negated for class 0: proponents always push towards ``target``.
    """

    target: torch.Tensor
    logits: torch.Tensor
    proponent_indices: torch.Tensor
    proponent_scores: torch.Tensor
    opponent_indices: torch.Tensor
    opponent_scores: torch.Tensor
    similar_indices: torch.Tensor
    similar_scores: torch.Tensor
    contributions: torch.Tensor | None = None


def _running_top_k(best: TopK | None, scores: torch.Tensor, offset: int, k: int) -> TopK:
    """Merge the top-k of one block of columns (starting at ``offset``) into the best so far."""
    values, indices = scores.topk(min(k, scores.shape[1]), dim=1)
    indices = indices + offset
    if best is not None:
        values, order = torch.cat([best[0], values], 1).topk(min(k, best[0].shape[1] + values.shape[1]), dim=1)
        indices = torch.cat([best[1], indices], 1).gather(1, order)
    return values, indices


def _column_blocks(
    surrogate: KernelSurrogate, query_kernel: Any, query_features: Any, spec: FeatureSpec | None, block_size: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(training columns, κ(query, X_train[columns]))`` blocks."""
    num_train = surrogate.hparams.num_train
    query = None if query_features is None else surrogate.unit_query_features(query_features, spec)
    for start in range(0, num_train, block_size):
        columns = slice(start, min(start + block_size, num_train))
        if query is None:
            yield columns, torch.as_tensor(query_kernel[:, columns])
        else:
            yield columns, query @ surrogate.train_features[columns].T


@torch.no_grad()
def attribute(
    surrogate: KernelSurrogate,
    *,
    query_kernel: Any = None,
    query_features: Any = None,
    top_k: int = 5,
    target: Any = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    return_contributions: bool = False,
    spec: FeatureSpec | None = None,
) -> Attribution:
    """Proponents, opponents and most similar training points (at most ``top_k`` each) per query.

    Give either ``query_kernel`` (``[M, N_train]`` rows built like the training kernel) or
    ``query_features`` (for surrogates fitted with :func:`~lightning_ntk.surrogate.fit_from_features`);
    ``spec``, when given, must match the training features'. ``target`` is the class to explain per
    query (an int or ``[M]``; default: the surrogate's predicted class).
    """
    if (query_kernel is None) == (query_features is None):
        raise ValueError("Pass exactly one of query_kernel= (kernel rows) or query_features= (features).")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    if query_kernel is not None:
        logits = surrogate.predict(query_kernel, spec, block_size)  # also validates the rows
    else:
        logits = surrogate.predict_from_features(query_features, spec, block_size)
    weight = surrogate.weight.detach()
    single = weight.shape[0] == 1
    if target is None:
        target = predictions(logits)
    target = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if target.numel() not in (1, logits.shape[0]):
        raise ValueError(f"Got {target.numel()} targets for {logits.shape[0]} queries: pass one class, or one per query.")
    target = target.expand(logits.shape[0]).to(weight.device)
    classes = 2 if single else weight.shape[0]
    if target.numel() and (target.min() < 0 or target.max() >= classes):
        raise ValueError(f"target must hold classes in 0..{classes - 1}, got {target.min().item()}..{target.max().item()}.")
    sign = (2 * target - 1).to(weight.dtype).unsqueeze(1) if single else None

    proponents = opponents = similar = None
    full = []
    for columns, block in _column_blocks(surrogate, query_kernel, query_features, spec, block_size):
        block = block.to(weight.device, weight.dtype)
        contributions = block * (weight[0, columns] * sign if single else weight[:, columns][target])
        if return_contributions:
            full.append(contributions.cpu())
        proponents = _running_top_k(proponents, contributions, columns.start, top_k)
        opponents = _running_top_k(opponents, -contributions, columns.start, top_k)
        similar = _running_top_k(similar, block, columns.start, top_k)
    return Attribution(
        target=target.cpu(),
        logits=logits,
        proponent_indices=proponents[1].cpu(),
        proponent_scores=proponents[0].cpu(),
        opponent_indices=opponents[1].cpu(),
        opponent_scores=-opponents[0].cpu(),
        similar_indices=similar[1].cpu(),
        similar_scores=similar[0].cpu(),
        contributions=torch.cat(full, 1) if return_contributions else None,
    )
