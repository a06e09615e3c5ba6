"""Surrogate fit time against the number of training examples, next to scikit-learn, as one table.

The kernel is the cosine-normalised proj-trNTK (K = 512, ``projector="sketch"``) of a digits MLP
(64-64-64-10) trained for 3 epochs on scikit-learn's digits; noise-augmented copies of the digits
(Gaussian noise, σ = 0.15, clipped to [0, 1]) bring the data to the largest N. For each N (10
classes, α = 1e-4), side by side in one process:

- **ours**: :func:`lightning_ntk.fit_from_kernel` on the float32 kernel, as the callback builds it,
  with its default tolerance;
- **sklearn**: ``LogisticRegression`` (lbfgs, multinomial) on the same kernel in float64 with
  ``C = 1/(α·N)``, which is the same objective (sklearn minimises ``C·Σ loss + ½‖W‖²``, ours
  ``mean loss + α/2·‖W‖²``; neither penalises the intercept), at its default ``tol = 1e-4`` and at
  ``tol = 1e-6``, each an uninterrupted fit. Where it would take longer than ``--sklearn-seconds``,
  its ``max_iter`` is set (from the time of a 20-iteration fit) to stop it after about that long,
  and the row says so: the speed-up is then a lower bound.

Both objectives are evaluated by the same float64 code. "gap" is ``(f_sklearn − f_ours)/f_ours``:
positive means ours is lower. A last table shows a warm start: the kernel of the network after one
more epoch (lr 1e-3), fitted from scratch and from the previous epoch's surrogate (``init=``).

Usage: ``python benchmarks/surrogate_fit.py [--sizes 1000 2000 5000 10000] [--sklearn-seconds 120]
[--threads 2]`` (torch's and sklearn's BLAS threads); ``--quick`` runs N = 1,000 and 2,000 with a 60 s cap.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import numpy as np
import torch
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import nn

import lightning_ntk as ln
from lightning_ntk.demos import load_digits_tensors

ALPHA = 1e-4
PROJECTION_DIM = 512


def digits_network(x: torch.Tensor, y: torch.Tensor, epochs: int, network: nn.Module | None = None, lr: float = 1e-2) -> nn.Module:
    torch.manual_seed(0)
    network = network or nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(network.parameters(), lr)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            loss = nn.functional.cross_entropy(network(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return network.eval()


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 of scikit-learn's digits."""
    x_train, y_train, x_test, y_test = load_digits_tensors()
    return torch.cat([x_train, x_test]), torch.cat([y_train, y_test])


def augmented(x: torch.Tensor, y: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and noisy copies of it, shuffled: ``size`` examples."""
    generator = torch.Generator().manual_seed(1)
    copies = -(-size // len(x))
    noisy = [(x + 0.15 * torch.randn(x.shape, generator=generator)).clamp(0, 1) for _ in range(copies - 1)]
    order = torch.randperm(copies * len(x), generator=generator)[:size]
    return torch.cat([x, *noisy])[order], y.repeat(copies)[order]


def objective(kernel: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> float:
    """Mean softmax cross-entropy of ``K Wᵀ + b`` plus ``α/2·‖W‖²``, in float64."""
    logits = kernel @ weight.T + bias
    return float((logsumexp(logits, axis=1) - logits[np.arange(len(labels)), labels]).mean() + 0.5 * ALPHA * (weight**2).sum())


def fit_ours(kernel: torch.Tensor, labels: torch.Tensor, **options) -> tuple[ln.KernelSurrogate, float]:
    started = time.perf_counter()
    surrogate = ln.fit_from_kernel(kernel, labels, alpha=ALPHA, device="cpu", **options)
    return surrogate, time.perf_counter() - started


def fit_sklearn(kernel: np.ndarray, labels: np.ndarray, tol: float, seconds: float, probe: int = 20) -> dict:
    """sklearn's fit at ``tol``, uninterrupted, its ``max_iter`` set from the time of a ``probe``-iteration
    fit so that it stops after about ``seconds``."""

    def run(max_iter: int) -> tuple[LogisticRegression, float]:
        model = LogisticRegression(C=1 / (ALPHA * len(labels)), tol=tol, max_iter=max_iter)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(kernel, labels)
        return model, time.perf_counter() - started

    model, elapsed = run(probe)
    max_iter = probe
    if model.n_iter_[0] >= probe:
        max_iter = max(probe, int(seconds / elapsed * probe))
        model, elapsed = run(max_iter)
    value = objective(kernel, labels, model.coef_, model.intercept_)
    return {"seconds": elapsed, "iterations": int(model.n_iter_[0]), "objective": value, "capped": model.n_iter_[0] >= max_iter}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    parser.add_argument("--sklearn-seconds", type=float, default=120.0, help="about the longest an sklearn fit may run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="N = 1,000 and 2,000, sklearn capped at 60 s")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.sklearn_seconds = [1000, 2000], 60.0
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # the same number of threads for sklearn's BLAS

    x_digits, y_digits = digits()
    network = digits_network(x_digits, y_digits, epochs=3)
    x, y = augmented(x_digits, y_digits, max(args.sizes))
    features = ln.project_features(network, x, "trntk", PROJECTION_DIM, projector="sketch")
    print(f"proj-trNTK (K = {PROJECTION_DIM}, sketch) of a digits MLP, {len(x):,} examples, 10 classes, α = {ALPHA:g}; "
          f"torch {torch.__version__}, {args.threads} threads\n")

    print("| N | ours (s) | ours: Newton steps, kernel passes | sklearn tol 1e-4 (default): s, gap | "
          "sklearn tol 1e-6: s, L-BFGS iterations, gap | × faster than sklearn tol 1e-6 |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        kernel = ln.kernel_from_features(features[:size])
        labels = y[:size]
        surrogate, seconds = fit_ours(kernel, labels)
        kernel64, labels64 = kernel.double().numpy(), labels.numpy()
        ours = objective(kernel64, labels64, surrogate.weight.detach().double().numpy(), surrogate.bias.detach().double().numpy())
        default, tight = (fit_sklearn(kernel64, labels64, tol, args.sklearn_seconds) for tol in (1e-4, 1e-6))
        record = surrogate.fit_record
        cells = [f"{size:,}", f"{seconds:.2f}", f"{record['iterations']}, {record['kernel_passes']}" + ("" if record["converged"] else " (not converged)")]
        for fit in (default, tight):
            capped = f" (stopped at max_iter, set for {args.sklearn_seconds:g} s)" if fit["capped"] else ""
            iterations = f"{fit['iterations']:,}, " if fit is tight else ""
            cells.append(f"{fit['seconds']:.1f}, {iterations}{(fit['objective'] - ours) / ours:+.1e}{capped}")
        cells.append(f"{tight['seconds'] / seconds:.0f}×" + (" (at least)" if tight["capped"] else ""))
        print("| " + " | ".join(cells) + " |", flush=True)

    size = min(max(args.sizes), 5000)
    labels = y[:size]
    next_epoch = digits_network(x_digits, y_digits, epochs=1, network=copy.deepcopy(network), lr=1e-3)
    before = ln.kernel_from_features(features[:size])
    after = ln.kernel_from_features(ln.project_features(next_epoch, x[:size], "trntk", PROJECTION_DIM, projector="sketch"))
    previous, _ = fit_ours(before, labels)
    cold, cold_seconds = fit_ours(after, labels)
    warm, warm_seconds = fit_ours(after, labels, init=previous)
    print(f"\nWarm start, N = {size:,}: the next epoch's kernel (mean |Δκ| = {float((after - before).abs().mean()):.4f})\n")
    print("| start | seconds | Newton steps | kernel passes | objective |")
    print("|---|---|---|---|---|")
    for name, fitted, seconds in (("zero", cold, cold_seconds), ("previous surrogate", warm, warm_seconds)):
        record = fitted.fit_record
        print(f"| {name} | {seconds:.2f} | {record['iterations']} | {record['kernel_passes']} | {record['objective']:.10f} |")


if __name__ == "__main__":
    main()
