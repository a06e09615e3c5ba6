"""Which training examples explain a prediction, scored two ways from the fitted surrogate.

- ``"influence"`` (the default): how much the query's margin would drop if training example ``j`` were
  removed and the surrogate refitted, to first order. This is what retraining experiments measure (the
  linear datamodeling score, :mod:`lightning_ntk.datamodeling`), and it predicts them far better.
- ``"representer"``: the contribution ``W[c, j]·κ(x, x_j)`` of ``j`` to the logit of class ``c``; the
  surrogate's logit decomposes exactly into these plus a bias (the paper's explanation).

Scores are computed block by block over the training set with a running top-k, so memory is
``O(M·block_size)`` and an ``M × N_train`` matrix exists only when asked for. Several checkpoints'
surrogates may be given at once: their scores are averaged (an ensemble, as TRAK averages models).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .featurize import FeatureSpec
from .kernels import DEFAULT_BLOCK_SIZE
from .metrics import predictions
from .sharding import Shard
from .surrogate import KernelSurrogate

TopK = tuple[torch.Tensor, torch.Tensor]  # (values, indices), each [M, k]
METHODS = ("influence", "representer")


@dataclass
class Attribution:
    """Top-k training points for each of ``M`` queries; indices are positions in the training set the
    surrogate was fitted on.

    - ``method``: how ``scores`` were computed (see the module); ``target`` ``[M]``: the class explained;
      ``logits`` ``[M, C_out]``: the surrogate's logits (the last checkpoint's, for an ensemble).
    - ``proponent_*``: the largest scores (the training examples that most support ``target``);
      ``opponent_*``: the most negative; ``similar_*``: the largest raw kernel values ``κ(x, x_j)``.
    - ``scores`` ``[M, N_train]``: every score, only with ``return_scores=True``. For ``"representer"``
      they sum with the bias ``b[target]`` to the target's logit.

    For a single-logit surrogate the explained logit is ``z`` for class 1 and ``−z`` for class 0, so
    scores are signed towards ``target`` for both methods.
    """

    method: str
    target: torch.Tensor
    logits: torch.Tensor
    proponent_indices: torch.Tensor
    proponent_scores: torch.Tensor
    opponent_indices: torch.Tensor
    opponent_scores: torch.Tensor
    similar_indices: torch.Tensor
    similar_scores: torch.Tensor
    scores: torch.Tensor | None = None


def _running_top_k(best: TopK | None, scores: torch.Tensor, columns: slice | torch.Tensor, k: int) -> TopK:
    """Merge the top-k of one block of training ``columns`` (a range, or a shard's positions) into the best so far."""
    values, indices = scores.topk(min(k, scores.shape[1]), dim=1)
    indices = indices + columns.start if isinstance(columns, slice) else columns[indices]
    if best is not None:
        values, order = torch.cat([best[0], values], 1).topk(min(k, best[0].shape[1] + values.shape[1]), dim=1)
        indices = torch.cat([best[1], indices], 1).gather(1, order)
    return values, indices


def _merged_top_k(shard: Shard, best: TopK, k: int) -> TopK:
    """The top-k over all ranks from each rank's top-k of its own columns: one all-gather of ``[M, k]`` scores
    and positions."""
    missing = k - best[0].shape[1]  # a rank with fewer than k rows
    values = torch.cat([best[0], best[0].new_full((len(best[0]), missing), -torch.inf)], 1)
    indices = torch.cat([best[1], best[1].new_full((len(best[1]), missing), -1)], 1)
    values, order = torch.cat(shard.all_gather(values), 1).topk(min(k, shard.num_train), dim=1)
    return values, torch.cat(shard.all_gather(indices), 1).gather(1, order)


def _own_columns(surrogate: KernelSurrogate, block_size: int) -> Iterator[tuple[slice, slice | torch.Tensor]]:
    """``(rows of train_features, training columns)`` blocks of the training examples this process holds:
    all of them (columns a range), or its shard's (columns the shard's positions)."""
    shard = surrogate.shard
    count = surrogate.hparams.num_train if shard is None else len(shard.rows)
    for start in range(0, count, block_size):
        here = slice(start, min(start + block_size, count))
        yield here, here if shard is None else shard.rows[here]


def _column_blocks(
    surrogate: KernelSurrogate, query_kernel: Any, query_features: Any, spec: FeatureSpec | None, block_size: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(training columns, κ(query, X_train[columns]))`` blocks of the columns this process holds, in float64."""
    query = None if query_features is None else surrogate.unit_query_features(query_features, spec)
    for here, columns in _own_columns(surrogate, block_size):
        if query is None:
            block = torch.as_tensor(query_kernel[:, columns])
        else:
            block = query @ surrogate.feature_rows[here].T
        yield columns, block.double()


def margin_gradients(surrogate: KernelSurrogate, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[M, C_out]``: the gradient with respect to the logits of each query's margin for its ``target`` class:
    ``log p/(1 − p)`` of the target under the surrogate's own model (the softmax margin ``z_t − logsumexp_{c≠t} z_c``
    for a multinomial surrogate; ``z_t`` for one-vs-rest; ``±z`` for a single logit)."""
    logits = logits.double()
    if logits.shape[1] == 1:
        return (2 * target - 1).double().unsqueeze(1)
    chosen = torch.nn.functional.one_hot(target, logits.shape[1]).double()
    if surrogate.hparams.formulation != "multinomial":
        return chosen
    others = torch.softmax(logits.masked_fill(chosen.bool(), -torch.inf), 1)
    return chosen - others


class _Influence:
    """The surrogate's leave-one-out: the first-order change of a query's margin when training example ``j``
    is removed and the surrogate refitted.

    Removing ``j`` from a kernel machine drops its loss term and its basis function ``κ(·, x_j)`` (the column
    ``W[:, j]``). One constrained Newton step of the objective from the optimum gives the change of the
    parameters, ``Δθ = H⁻¹(∇ℓ_j/N − E_j μ_j)``, with ``μ_j`` the multiplier that sets ``W[:, j]`` to zero
    (``E_j`` selects that column), and the margin changes by ``∇m(x)·Δθ``. The score is minus that change:
    positive when ``j`` supports the query's margin. ``H⁻¹`` is exact on the span of the kernel's top
    eigenvectors and the bias (the Hessian the solver factored at its last step, :class:`Curvature`) and
    ``1/α`` elsewhere, where kernel rows have little weight: on the digits this matched the full dual
    Newton step (an ``N·C``-dimensional system) to a correlation of 1.000 with 64 eigenvectors, at a
    cost linear in ``N``. Refitting ``N`` times instead would cost ``N`` fits.

    The training side does not depend on the queries: it is computed once per surrogate (:meth:`of`) and
    kept, ``N·(r + 1)·C`` numbers (of a shard's rows only, with sharded features: ``position`` maps training
    columns to them).
    """

    _cache: "weakref.WeakKeyDictionary[KernelSurrogate, _Influence]" = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, surrogate: KernelSurrogate) -> "_Influence":
        """The surrogate's influence, made once for its current curvature."""
        influence = cls._cache.get(surrogate)
        if influence is None or influence.curvature is not surrogate.curvature:
            influence = cls._cache[surrogate] = cls(surrogate)
        return influence

    def __init__(self, surrogate: KernelSurrogate):
        curvature = surrogate.curvature
        if curvature is None:
            raise ValueError("This surrogate carries no curvature (it was not fitted by fit_from_kernel/fit_from_features): refit it, or use method='representer'.")
        self.curvature, self.alpha = curvature, surrogate.penalty
        self.num_train = surrogate.hparams.num_train
        self.weight = surrogate.weight.detach().double().cpu()
        self.width, self.outputs = curvature.basis.shape[1] + 1, self.weight.shape[0]
        self.inverse = torch.cholesky_inverse(curvature.hessian_factor).view(self.width, self.outputs, self.width, self.outputs)
        blocks = [self._training_block(columns) for _, columns in _own_columns(surrogate, DEFAULT_BLOCK_SIZE)]
        self.directions, self.multipliers = (torch.cat(parts) for parts in zip(*blocks))
        self.position = None
        if surrogate.shard is not None:
            self.position = torch.empty(self.num_train, dtype=torch.long)
            self.position[surrogate.shard.rows] = torch.arange(len(surrogate.shard.rows))

    def query_side(self, projections: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """``H⁻¹ ∇m(x)`` on the basis, ``[M, r + 1, C]``, from the queries' projections on the basis ``κ_x·U``
        and their margin gradients."""
        design = torch.cat([projections, projections.new_ones(len(projections), 1)], 1)
        return torch.einsum("acbd,ma,mc->mbd", self.inverse, design, gradients)

    def _training_block(self, columns: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """For the training examples in ``columns``: the removal direction on the basis, ``[J, r + 1, C]``
        (``E_j μ_j − ∇ℓ_j/N`` there), and the multipliers ``μ_j`` ``[J, C]``."""
        c = self.curvature
        basis, residuals = c.basis[columns], c.residuals[columns]
        zero = basis.new_zeros(len(basis), 1)
        on_basis, design = torch.cat([basis, zero], 1), torch.cat([basis * c.eigenvalues, zero + 1], 1)
        outside = 1 - basis.square().sum(1)  # ‖e_j − U U_jᵀ‖²: what of the column lies off the basis
        inverse_on_column = torch.einsum("ja,jb,acbd->jcd", on_basis, on_basis, self.inverse)
        inverse_on_column += (outside.clamp_min(0) / self.alpha)[:, None, None] * torch.eye(self.outputs, dtype=basis.dtype)
        loss_gradient = torch.einsum("acbd,jb,jd->jac", self.inverse, design, residuals)
        off_basis_row = c.kernel_diagonal[columns] - (basis.square() * c.eigenvalues).sum(1)  # ((I − U Λ Uᵀ) k_j)_j
        column_change = torch.einsum("ja,jac->jc", on_basis, loss_gradient) + (off_basis_row / self.alpha)[:, None] * residuals
        multipliers = torch.linalg.solve(inverse_on_column, (column_change / self.num_train + self.weight[:, columns].T).unsqueeze(-1))[..., 0]
        direction = on_basis[:, :, None] * multipliers[:, None, :] - design[:, :, None] * residuals[:, None, :] / self.num_train
        return direction, multipliers

    def scores(self, query_side: torch.Tensor, projections: torch.Tensor, gradients: torch.Tensor, block: torch.Tensor, columns: slice) -> torch.Tensor:
        """``[M, J]`` scores of the training examples in ``columns`` for the queries (``block``: their kernel rows)."""
        own = columns if self.position is None else self.position[columns]
        direction, multipliers = self.directions[own], self.multipliers[own]
        on_basis = torch.einsum("mac,jac->mj", query_side, direction)
        off_basis_rows = block - projections @ self.curvature.basis[columns].T
        return on_basis + (gradients @ multipliers.T) * off_basis_rows / self.alpha


def _targets(logits: torch.Tensor, target: Any, network_logits: Any, outputs: int) -> torch.Tensor:
    if target is None:
        target = predictions(torch.as_tensor(network_logits) if network_logits is not None else logits)
    target = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if target.numel() not in (1, logits.shape[0]):
        raise ValueError(f"Got {target.numel()} targets for {logits.shape[0]} queries: pass one class, or one per query.")
    target = target.expand(logits.shape[0])
    classes = max(2, outputs)
    if target.numel() and (target.min() < 0 or target.max() >= classes):
        raise ValueError(f"target must hold classes in 0..{classes - 1}, got {target.min().item()}..{target.max().item()}.")
    return target


def _scorer(surrogate: KernelSurrogate, logits: torch.Tensor, target: torch.Tensor, column_blocks: Callable[[], Iterator[tuple[slice, torch.Tensor]]],
            method: str) -> Callable[[torch.Tensor, slice], torch.Tensor]:
    """``score(block, columns)``: one surrogate's ``[M, J]`` scores for the training examples in ``columns``,
    from the queries' kernel rows there (``block``)."""
    if method == "representer":
        weight = surrogate.weight.detach().double().cpu()
        explained = weight[0] * (2 * target - 1).double().unsqueeze(1) if weight.shape[0] == 1 else weight[target]
        return lambda block, columns: block * explained[:, columns]
    influence = _Influence.of(surrogate)
    projections = sum(block @ influence.curvature.basis[columns] for columns, block in column_blocks())
    if surrogate.shard is not None:  # the queries' projections on the basis sum over every rank's columns
        projections = surrogate.shard.all_reduce(projections)
    gradients = margin_gradients(surrogate, logits, target)
    query_side = influence.query_side(projections, gradients)
    return lambda block, columns: influence.scores(query_side, projections, gradients, block, columns)


@torch.no_grad()
def attribute(
    surrogate: KernelSurrogate | Sequence[KernelSurrogate],
    *,
    query_kernel: Any = None,
    query_features: Any = None,
    top_k: int = 5,
    target: Any = None,
    network_logits: Any = None,
    method: str = "influence",
    block_size: int = DEFAULT_BLOCK_SIZE,
    return_scores: bool = False,
    spec: FeatureSpec | None = None,
) -> Attribution:
    """Proponents, opponents and most similar training points (at most ``top_k`` each) per query.

    Give either ``query_kernel`` (``[M, N_train]`` rows built like the training kernel) or
    ``query_features`` (for surrogates fitted with :func:`~lightning_ntk.surrogate.fit_from_features`);
    ``spec``, when given, must match the training features'. ``method``: ``"influence"`` (default) or
    ``"representer"`` (see the module). ``target`` is the class to explain per query (an int or ``[M]``);
    by default the network's predicted class when ``network_logits`` ``[M, C]`` are given, else the
    surrogate's. ``top_k`` may be up to ``N_train``; ``return_scores=True`` also returns every score.

    An ensemble: a sequence of surrogates (e.g. several checkpoints of one training run, over the same
    training examples) with a sequence of as many query kernels (or query features), each built with its
    surrogate's network state; their scores are averaged.
    """
    members = list(surrogate) if isinstance(surrogate, (list, tuple)) else [surrogate]
    if (query_kernel is None) == (query_features is None):
        raise ValueError("Pass exactly one of query_kernel= (kernel rows) or query_features= (features).")
    queries = query_kernel if query_kernel is not None else query_features
    queries = list(queries) if len(members) > 1 or isinstance(queries, (list, tuple)) else [queries]
    if len(queries) != len(members) or len({m.hparams.num_train for m in members}) != 1:
        raise ValueError(f"An ensemble needs one query kernel (or features) per surrogate, all over the same training set; got "
                         f"{len(members)} surrogate(s) and {len(queries)} query arrays.")
    if method not in METHODS:
        raise ValueError(f"Unknown attribution method {method!r}; choose one of {METHODS}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    by_kernel = query_kernel is not None
    all_logits = [
        s.predict(q, spec, block_size) if by_kernel else s.predict_from_features(q, spec, block_size)  # also validates the queries
        for s, q in zip(members, queries)
    ]
    logits = all_logits[-1]
    outputs = members[-1].weight.shape[0]
    target = _targets(logits, target, network_logits, outputs)

    column_blocks = [functools.partial(_column_blocks, s, q if by_kernel else None, None if by_kernel else q, spec, block_size) for s, q in zip(members, queries)]
    scorers = [_scorer(s, member_logits, target, blocks, method) for s, member_logits, blocks in zip(members, all_logits, column_blocks)]
    proponents = opponents = similar = None
    full = []
    for parts in zip(*(blocks() for blocks in column_blocks)):
        columns = parts[0][0]
        total = sum(score(block, columns) for (_, block), score in zip(parts, scorers)) / len(scorers)
        if return_scores:
            full.append(total)
        proponents = _running_top_k(proponents, total, columns, top_k)
        opponents = _running_top_k(opponents, -total, columns, top_k)
        similar = _running_top_k(similar, parts[-1][1], columns, top_k)
    shard = members[-1].shard
    scores = torch.cat(full, 1) if return_scores else None
    if shard is not None:  # each rank ranked its own columns
        proponents, opponents, similar = (_merged_top_k(shard, best, top_k) for best in (proponents, opponents, similar))
        scores = None if scores is None else shard.gather(scores.T).T
    return Attribution(
        method=method,
        target=target,
        logits=logits,
        proponent_indices=proponents[1],
        proponent_scores=proponents[0].float(),
        opponent_indices=opponents[1],
        opponent_scores=-opponents[0].float(),
        similar_indices=similar[1],
        similar_scores=similar[0].float(),
        scores=scores,
    )


def suspicious(surrogate: KernelSurrogate, top_k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` training examples most likely mislabelled, with their scores: the surrogate's loss on
    each at its optimum. A mislabelled example is one the kernel machine cannot fit without contradicting
    its neighbours; with 10% of the digits' labels flipped this ranking found them as well as or better
    than TRAK's self-influence and the network's own loss (AUROC 0.998 and 0.999 against 0.997/0.991
    and 0.998/0.989 on an MLP and a CNN: ``benchmarks/attribution_quality.py``)."""
    if surrogate.curvature is None:
        raise ValueError("This surrogate carries no training losses (it was not fitted by fit_from_kernel/fit_from_features): refit it.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    losses, positions = surrogate.curvature.losses.topk(min(top_k, surrogate.curvature.losses.numel()))
    return positions, losses
