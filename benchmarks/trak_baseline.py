"""TRAK on the CPU: the side-by-side baseline of the attribution benchmark.

The benchmark asks whether this project's NTK-surrogate attributions are as good as the method they are
most often compared with. The baseline is the authors' own package (``traker==0.3.2``, MIT licence),
driven through its public API with its documented flow, so that its numbers are TRAK's and not those of
a re-implementation. :func:`trak_scores` returns TRAK's query-by-train scores, ensembled over the given
checkpoints as TRAK does it, and each training example's self-influence (for mislabel detection).

    python benchmarks/trak_baseline.py           # smoke check on 300 digits, ~10 s on 1 thread
    python benchmarks/trak_baseline.py --timing  # 1,000 digits, 300 queries, K = 1,024, 2 threads
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from unittest import mock

import numpy as np
import torch
import trak.traker
from torch import nn
from tqdm import tqdm
from trak import TRAKer
from trak.projectors import BasicProjector, ProjectionType

# The largest block of the Rademacher matrix that BasicProjector holds at once: 64 MiB of float32.
MAX_PROJECTION_BLOCK_FLOATS = 2**24
EXPERIMENT_NAME = "targets"


@dataclass
class TrakResult:
    scores: torch.Tensor  # [Q, N] float64; > 0: training on the example raises the query's margin
    self_influence: torch.Tensor  # [N] float64; TRAK's score of each training example for itself
    seconds: float  # featurizing + scoring, TRAKer construction included


def trak_scores(
    checkpoints: Sequence[nn.Module],
    train: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    proj_dim: int = 1024,
    seed: int = 0,
    batch_size: int = 100,
    workdir: str | None = None,
    lambda_reg: float = 0.0,
) -> TrakResult:
    """TRAK scores of ``query`` against ``train`` for C-class classifiers returning [B, C] logits.

    ``checkpoints`` are modules of one architecture (one trained model, models trained with other seeds,
    or epochs of one run); each gets its own projection, and TRAK averages their scores. ``train`` and
    ``query`` are ``(inputs, labels)`` pairs of any input shape. ``lambda_reg`` is TRAK's ridge on its
    ``XᵀX``: with K close to or above the number of training examples that matrix is singular and TRAK
    needs it (the benchmark tunes it). TRAK's CPU projector regenerates its
    whole matrix for every batch, which dominates its time: a larger ``batch_size`` is much faster (an
    MLP on 1,000 digits, K = 1,024: about 8 s at 100, 2.2 s at 1,000).

    Self-influence is read off TRAK itself: the training examples are scored as targets together with
    the queries, and the diagonal of the train-by-train block is each example's score for itself. It is
    exactly TRAK's estimator (the same projected gradients, ``(X^T X)^-1`` and out-to-loss weights, per
    checkpoint and averaged), at the price of an N × N score block, which is small for N ≤ 2,000.

    TRAK keeps its state in memory-mapped files: every call works in a fresh temporary folder (inside
    ``workdir`` if given) that is deleted on return, so calls never see each other's features.
    """
    train_x, train_y = train
    query_x, query_y = query
    target_x, target_y = torch.cat([query_x, train_x]), torch.cat([query_y, train_y])
    # TRAKer loads each checkpoint into the model it is given: a copy leaves the callers' modules intact.
    model = copy.deepcopy(checkpoints[0])
    grad_dim = sum(parameter.numel() for parameter in model.parameters())

    with tempfile.TemporaryDirectory(prefix="trak_", dir=workdir) as save_dir, _without_progress_bars():
        start = time.perf_counter()
        projector = BasicProjector(
            grad_dim=grad_dim,
            proj_dim=proj_dim,
            seed=seed,
            proj_type=ProjectionType.rademacher,
            device="cpu",
            block_size=_projection_block_size(grad_dim, proj_dim),
            dtype=torch.float32,
        )
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=len(train_x),
            save_dir=save_dir,
            device="cpu",
            projector=projector,
            use_half_precision=False,
            logging_level=logging.WARNING,
            lambda_reg=lambda_reg,
        )
        for model_id, checkpoint in enumerate(checkpoints):
            traker.load_checkpoint(checkpoint.state_dict(), model_id=model_id)
            for batch in _batches(train_x, train_y, batch_size):
                traker.featurize(batch=batch, num_samples=len(batch[0]))
        traker.finalize_features()

        for model_id, checkpoint in enumerate(checkpoints):
            traker.start_scoring_checkpoint(
                EXPERIMENT_NAME, checkpoint.state_dict(), model_id=model_id, num_targets=len(target_x)
            )
            for batch in _batches(target_x, target_y, batch_size):
                traker.score(batch=batch, num_samples=len(batch[0]))
        # Copied out of the memory map before its folder is deleted.
        train_by_target = torch.from_numpy(np.array(traker.finalize_scores(EXPERIMENT_NAME), dtype=np.float64))
        seconds = time.perf_counter() - start

    n_query = len(query_x)
    return TrakResult(
        scores=train_by_target[:, :n_query].T.contiguous(),
        self_influence=train_by_target[:, n_query:].diagonal().clone(),
        seconds=seconds,
    )


def _projection_block_size(grad_dim: int, proj_dim: int) -> int:
    """At most MAX_PROJECTION_BLOCK_FLOATS per block, and always at least two blocks.

    With a single block, trak 0.3.2's BasicProjector frees its matrix in ``finalize_features`` and then
    fails to score a lone checkpoint (AttributeError on ``proj_matrix``). With several it regenerates
    the whole matrix, block by block, for every batch, so two blocks cost no more than ten.
    """
    return max(1, min(math.ceil(proj_dim / 2), MAX_PROJECTION_BLOCK_FLOATS // grad_dim))


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size].float(), y[start : start + batch_size].long()


@contextlib.contextmanager
def _without_progress_bars() -> Iterator[None]:
    """trak 0.3.2 draws a tqdm bar in every ``finalize_*`` call and has no switch for it; in a benchmark
    that runs TRAK many times they are noise. Its warnings and errors still come through its loggers."""
    with mock.patch.object(trak.traker, "tqdm", functools.partial(tqdm, disable=True)):
        yield


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target, dtype=torch.long)


def _train_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def _smoke_check() -> None:
    """300 training digits; 45 held-out queries plus 5 duplicates of training examples 0–4.

    Signs: a duplicate must score its original positive and among the top 1% of its row (equal to the
    original's self-influence), and scores must correlate positively with "same label as the query"
    (+1 / -1).
    """
    torch.set_num_threads(1)
    x, y = _digits()
    train_x, train_y = x[:300], y[:300]
    n_duplicates = 5
    query_x = torch.cat([x[300:345], train_x[:n_duplicates]])
    query_y = torch.cat([y[300:345], train_y[:n_duplicates]])
    models = [_train_mlp(train_x, train_y, hidden=32, seed=seed, epochs=10) for seed in (0, 1)]
    same_label = (query_y[:, None] == train_y[None, :]).double() * 2 - 1

    for n_checkpoints in (1, 2):
        result = trak_scores(models[:n_checkpoints], (train_x, train_y), (query_x, query_y), proj_dim=256)
        duplicate_rows = result.scores[-n_duplicates:]
        duplicate_scores = duplicate_rows.diagonal()
        duplicate_ranks = (duplicate_rows > duplicate_scores[:, None]).sum(1)  # 0: top of its row
        label_correlation = torch.corrcoef(torch.stack([result.scores.flatten(), same_label.flatten()]))[0, 1].item()
        print(
            f"{n_checkpoints} checkpoint(s): scores {tuple(result.scores.shape)}, self-influence "
            f"{tuple(result.self_influence.shape)}, {result.seconds:.2f} s, mean self-influence "
            f"{result.self_influence.mean():.4g} (min {result.self_influence.min():.3g}), duplicate scores "
            f"{[round(s, 4) for s in duplicate_scores.tolist()]} (row ranks {duplicate_ranks.tolist()}, "
            f"mean |score| {result.scores.abs().mean():.3g}), corr(score, same label) {label_correlation:+.3f}"
        )
        assert result.scores.shape == (len(query_x), len(train_x)) and result.scores.dtype == torch.float64
        assert result.self_influence.shape == (len(train_x),) and (result.self_influence > 0).all()
        assert torch.allclose(duplicate_scores, result.self_influence[:n_duplicates], rtol=1e-4)
        assert (duplicate_ranks < len(train_x) // 100).all() and label_correlation > 0


def _timing() -> None:
    """The benchmark's realistic size: an MLP 64-64-10 on 1,000 digits, 300 queries, K = 1,024."""
    torch.set_num_threads(2)
    x, y = _digits()
    model = _train_mlp(x[:1000], y[:1000], hidden=64, seed=0, epochs=10)
    result = trak_scores([model], (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300]), proj_dim=1024)
    print(f"1 checkpoint, N = 1,000, Q = 300, K = 1,024, 2 threads: {result.seconds:.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timing", action="store_true", help="time the benchmark's realistic size instead")
    if parser.parse_args().timing:
        _timing()
    else:
        _smoke_check()
