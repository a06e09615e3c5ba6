"""The kernel-machine surrogate (kGLM): ``logits(x) = W κ(x, X_train) + b``, a ``LightningModule``.

It is fitted on the training labels by minimising the mean cross-entropy plus ``α/2·κ̄²‖W‖²``, where
``κ̄`` is the kernel's mean diagonal (1 for a cosine-normalised kernel, where this is the paper's
``α/2·‖W‖²``): the problem on the kernel ``K / κ̄``, so that the fit, its logits and α's meaning do not
depend on the kernel's units (the bias is not penalised, as in sklearn). Its inputs are kernel rows: a precomputed ``[N, N]`` matrix, or
stored ``[N, C, K]`` / ``[N, K]`` features, whose kernel ``Φ Φᵀ`` is applied as ``Φ (Φᵀ x)`` without
being formed (memory ``O(N·C·K)``).

The solver is a Newton method written for this objective. At the paper's ``α = 1e-4`` the problem
is very ill-conditioned (Hessian eigenvalues from ``α`` to ``~λ_max(K)²/N``), which makes first-order
methods and L-BFGS take hundreds to thousands of iterations. But the ill-conditioning lives in few
directions: beyond the kernel's top eigenvectors the curvature of the loss, at most
``λ²/N``, is below ``α``. So a randomized Nyström approximation of those eigenvectors (two passes
over the kernel) gives a preconditioner that is the exact Hessian on them and on the bias,
rebuilt from the examples' current probabilities at every step, and ``α`` elsewhere. Each Newton
step solves its system by preconditioned conjugate gradients (about two Hessian products) and ends
with an exact line search, which is cheap because the logits are linear in the step. A fit takes
about ten steps and a few dozen passes over the kernel, so its cost grows like the kernel's size,
``N²`` (``benchmarks/surrogate_fit.py``). Kernel products run in the kernel's precision (float32 is memory-bound and
twice as fast), everything else in float64. Near the optimum the rounding of float32 products puts a floor
under the gradient (the Newton decrement stops at about ‖rounding‖²/α, far above the tolerance at small
α); once a step fails to shrink the gap as Newton steps do there, the remaining steps accumulate the
kernel products in float64 and converge as on a float64 kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.nn import functional as F

from .checks import FORMULATIONS, check_alpha, check_choice, check_count, check_solver_options
from .errors import LabelError
from .featurize import FeatureSpec
from .jacobian import all_finite
from .kernels import DEFAULT_BLOCK_SIZE, UnitRows, as_tensor, unit_rows
from .metrics import predictions
from .sharding import Shard

NORMALISED_TOLERANCE = 1e-3  # a cosine kernel has a unit diagonal and |κ| ≤ 1, up to float32 rounding
# relative to the kernel's size: far above the rounding of float32 (or bfloat16-input) products, far below a real fault
ASYMMETRY_TOLERANCE = 1e-2  # ‖K − Kᵀ‖_F / ‖K‖_F
INDEFINITE_TOLERANCE = 1e-2  # a negative eigenvalue against the largest


def check_finite(values: torch.Tensor, name: str) -> None:
    if not all_finite(values):
        raise ValueError(
            f"The {name} holds NaN or inf. Recompute it from finite features (an example whose gradient is zero "
            "has no cosine-normalised kernel: check the model's gradients, or use the unnormalised kind trntk0)."
        )


def _fitting_tensor(values: Any) -> torch.Tensor:
    """``values`` in the precision the surrogate is fitted in: float64 stays float64, the rest float32."""
    tensor = as_tensor(values)
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def flat_unit_features(features: Any, normalize: bool) -> torch.Tensor:
    """Features flattened to ``[N, C·K]``, each row scaled to unit norm when ``normalize``: then
    ``κ = Φ Φᵀ`` is the cosine-normalised kernel."""
    flat = _fitting_tensor(features).reshape(features.shape[0], -1)
    check_finite(flat, "feature array")
    if normalize:
        flat = unit_rows(flat)
    return flat


class _CrossEntropy:
    """The surrogate's mean cross-entropy over the training labels, in float64, with the derivatives
    its solver needs.

    Multinomial: softmax. One example's Hessian ``diag(p) − p pᵀ`` is written as the sum of PSD terms
    ``Σ_{k<l} p_k p_l (e_k − e_l)(e_k − e_l)ᵀ``, so that its projection is assembled without
    cancellation and stays PSD in floating point.
    One-vs-rest and single logit: independent sigmoids with per-entry weights ``w`` (sklearn's
    ``class_weight="balanced"`` for ``ovr``); Hessian ``w σ(1 − σ)``, diagonal across outputs.
    """

    def __init__(self, labels: torch.Tensor, num_outputs: int, formulation: str, class_weights: torch.Tensor):
        self.multinomial = formulation == "multinomial" and num_outputs > 1
        targets = F.one_hot(labels, max(2, num_outputs)).double()
        self.targets = targets[:, 1:] if num_outputs == 1 else targets
        self.weights = None
        if formulation == "ovr":
            balanced = class_weights.double().to(labels.device)
            # single logit: every example weighs its class's weight; ovr: positives N / (classes·N_c), negatives 1
            self.weights = balanced[labels][:, None] if num_outputs == 1 else torch.where(self.targets > 0, balanced, 1.0)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss and the probabilities at float64 ``logits``."""
        losses, probabilities = self.per_example(logits)
        return losses.mean(), probabilities

    def per_example(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's loss and probabilities at float64 ``logits``."""
        if self.multinomial:
            log_p = logits.log_softmax(1)
            return -(log_p * self.targets).sum(1), log_p.exp()
        losses = F.binary_cross_entropy_with_logits(logits, self.targets, weight=self.weights, reduction="none")
        return losses.sum(1), torch.sigmoid(logits)

    def _weighted(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.weights is None else self.weights * values

    def residual(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The gradient of the mean loss with respect to the logits."""
        return self._weighted(probabilities - self.targets) / len(probabilities)

    def hessian_product(self, probabilities: torch.Tensor, logit_step: torch.Tensor) -> torch.Tensor:
        """The Hessian of the mean loss with respect to the logits, applied to ``logit_step``."""
        if self.multinomial:
            product = probabilities * logit_step
            product = product - probabilities * product.sum(1, keepdim=True)
        else:
            product = self._weighted(probabilities * (1 - probabilities)) * logit_step
        return product / len(probabilities)

    def subspace_hessian(self, probabilities: torch.Tensor, design: torch.Tensor, block_elements: int = 1 << 20) -> torch.Tensor:
        """``Σ_i (design_i design_iᵀ) ⊗ H_i / N``, the Hessian of the mean loss with respect to the
        coefficients ``A`` of logits ``design @ A`` (``[q, C]``, flattened row-major).

        It is made of ``q×q`` Gram matrices ``designᵀ diag(w) design``, one per pair of outputs (per
        output without the softmax), computed together in row blocks of ``block_elements``."""
        count, width = design.shape
        outputs = probabilities.shape[1]
        if self.multinomial:  # block (k, l) is −G_kl, block (k, k) is Σ_l G_kl, with weights p_k p_l
            first, second = torch.triu_indices(outputs, outputs, 1, device=design.device)
            weights = probabilities[:, first] * probabilities[:, second]
        else:  # block (k, k) alone, with weights w σ(1 − σ)
            first = second = torch.arange(outputs, device=design.device)
            weights = self._weighted(probabilities * (1 - probabilities))
        rows = max(1, block_elements // (weights.shape[1] * width))
        grams = sum(
            (weights[start : start + rows, :, None] * design[start : start + rows, None, :]).flatten(1).T @ design[start : start + rows]
            for start in range(0, count, rows)
        ).reshape(-1, width, width)
        blocks = design.new_zeros(outputs, outputs, width, width)
        blocks[first, second] = grams
        if self.multinomial:
            blocks[second, first] = grams
            diagonal = blocks.sum(1)
            blocks = -blocks
            each = torch.arange(outputs, device=design.device)
            blocks[each, each] = diagonal
        return blocks.permute(2, 0, 3, 1).reshape(width * outputs, width * outputs) / count

    def mean_curvature(self, probabilities: torch.Tensor) -> float:
        """The mean of the Hessian's diagonal entries over examples and outputs."""
        return float(self._weighted(probabilities * (1 - probabilities)).mean())


class _KernelOperator:
    """Products ``K x / scale`` with the training kernel, held as an ``[N, N]`` matrix or as features ``Φ``
    (``[N, F]``, ``K = Φ Φᵀ``), on the device the fit runs on; features given as :class:`UnitRows` are read
    block by block at every product (two passes over them), never held whole. ``scale``, the kernel's mean diagonal, puts
    the kernel in units of itself, so that the solver sees the same problem whatever the kernel's units.

    Products run in the storage precision and return float64; :meth:`exact` accumulates in float64
    (row block by row block), for the final objective. ``passes`` counts the passes over the kernel.
    """

    def __init__(self, values: torch.Tensor, factored: bool, scale: float = 1.0):
        self.values, self.factored, self.scale = values, factored, scale
        self.size = values.shape[0]
        self.passes = 0

    def _in_storage_precision(self, x: torch.Tensor) -> torch.Tensor:
        if self.values.dtype != torch.float64:
            # entries 2⁻⁶⁰ below their column's largest do not change a float32 product, but would
            # reach it as subnormal numbers, which slow matrix products down many times over
            x = x.masked_fill(x.abs() < x.abs().amax(0) * 2.0**-60, 0.0)
        return x.to(self.values.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        x = self._in_storage_precision(x)
        if isinstance(self.values, UnitRows):
            product = self._blockwise(x, lambda rows: rows)
        else:
            product = self.values @ (self.values.T @ x) if self.factored else self.values @ x
        return product.double() / self.scale

    def _blockwise(self, x: torch.Tensor, cast: Callable[[torch.Tensor], torch.Tensor], rows: int | None = None) -> torch.Tensor:
        """``Φ (Φᵀ x)`` over row blocks of ``Φ`` (of ``rows``, or the :class:`UnitRows`' own), each ``cast`` once read."""
        rows = rows or self.values.block_size
        blocks = [slice(start, start + rows) for start in range(0, self.size, rows)]
        projected = sum(cast(self.values[block]).T @ x[block] for block in blocks)
        return torch.cat([cast(self.values[block]) @ projected for block in blocks])

    def diagonal(self) -> torch.Tensor:
        """The scaled kernel's diagonal, ``κ(x_i, x_i) / scale``, in float64."""
        if not self.factored:
            return self.values.diagonal().double() / self.scale
        rows = self.values.block_size if isinstance(self.values, UnitRows) else self.size
        return torch.cat([self.values[start : start + rows].double().pow(2).sum(1) for start in range(0, self.size, rows)]) / self.scale

    def exact(self, x: torch.Tensor, block_elements: int = 1 << 24) -> torch.Tensor:
        if self.values.dtype == torch.float64:
            return self(x)
        self.passes += 1
        rows = max(1, block_elements // self.values.shape[1])
        if self.factored:
            return self._blockwise(x, torch.Tensor.double, rows) / self.scale
        blocks = [slice(start, start + rows) for start in range(0, self.size, rows)]
        return torch.cat([self.values[block].double() @ x for block in blocks]) / self.scale


class _ShardedKernelOperator(_KernelOperator):
    """The products of :class:`_KernelOperator` with features sharded by rows over ranks (``values``: this
    rank's ``Φ_r``, the rows ``shard.rows``), for solver vectors ``x`` ``[N, C]`` replicated on every rank:
    ``K x = Φ (Φᵀ x)`` as ``z = Σ_r Φ_rᵀ x_r`` (one all-reduce of ``[F, C]``), then this rank's rows ``Φ_r z``,
    gathered (one all-gather of ``[N, C]``). Every rank gets the same product, so the solver, run on each rank,
    takes the same steps everywhere."""

    def __init__(self, values: torch.Tensor, shard: Shard, scale: float = 1.0):
        super().__init__(values, True, scale)
        self.shard, self.size = shard, shard.num_train

    def _product(self, x: torch.Tensor, dtype: torch.dtype, block_elements: int) -> torch.Tensor:
        """``K x`` (unscaled) with ``Φ_r`` read in row blocks and multiplied in ``dtype``."""
        local = x[self.shard.rows.to(x.device)].to(dtype)
        rows = max(1, block_elements // self.values.shape[1])
        blocks = [slice(start, start + rows) for start in range(0, max(1, len(local)), rows)]
        projected = self.shard.all_reduce(sum((self.values[block].to(dtype).T @ local[block] for block in blocks), local.new_zeros(self.values.shape[1], x.shape[1])))
        return self.shard.gather(torch.cat([self.values[block].to(dtype) @ projected for block in blocks]).double())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return self._product(self._in_storage_precision(x), self.values.dtype, self.values.numel()) / self.scale

    def diagonal(self) -> torch.Tensor:
        return self.shard.gather(self.values.double().pow(2).sum(1)) / self.scale

    def exact(self, x: torch.Tensor, block_elements: int = 1 << 24) -> torch.Tensor:
        if self.values.dtype == torch.float64:
            return self(x)
        self.passes += 1
        return self._product(x, torch.float64, block_elements) / self.scale


def _top_eigenpairs(kernel: _KernelOperator, rank: int, oversample: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's ``rank`` largest eigenpairs (orthonormal ``[N, r]`` basis, eigenvalues in decreasing
    order) by a randomized Nyström approximation with one power iteration: two passes over the kernel."""
    size = kernel.size
    device = kernel.values.device
    sketch = torch.randn(size, min(size, rank + oversample), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    range_basis = torch.linalg.qr(kernel(sketch.to(device))).Q
    image = kernel(range_basis)
    core, rotation = torch.linalg.eigh(0.5 * (range_basis.T @ image + image.T @ range_basis))
    # these Ritz values lie within the kernel's spectrum: a clearly negative one proves it indefinite
    if core[0] < -INDEFINITE_TOLERANCE * core[-1].abs():
        raise ValueError(
            f"The training kernel is not positive semidefinite: it has an eigenvalue of at most {float(core[0]) * kernel.scale:.4g} "
            f"(its largest is about {float(core[-1]) * kernel.scale:.4g}), so it is no kernel of features (κ(x, x') = φ(x)·φ(x')) "
            "and the surrogate's fit is not defined by it. Build it with kernel_from_features or exact_kernel, or pass a "
            "similarity that is a kernel (a distance matrix is not: use e.g. exp(-d²/σ²))."
        )
    # K ≈ factor factorᵀ; directions the kernel (numerically) annihilates are left out
    factor = image @ rotation * torch.where(core > core.max() * 1e-12, core.rsqrt(), 0.0)
    basis, singular_values, _ = torch.linalg.svd(factor, full_matrices=False)
    return basis[:, :rank], singular_values[:rank] ** 2


class _Objective:
    """``loss(K W + b) + α/2·‖W‖²`` as a function of ``θ = [W; b]`` (``[N + 1, C]``, float64), the bias
    unpenalised. Kernel products run in the kernel's precision, or, once ``precise``, accumulate in
    float64 (:meth:`_KernelOperator.exact`)."""

    def __init__(self, kernel: _KernelOperator, loss: _CrossEntropy, alpha: float):
        self.kernel, self.loss, self.alpha = kernel, loss, alpha
        self.precise = False

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.exact(x) if self.precise else self.kernel(x)

    def logits(self, theta: torch.Tensor) -> torch.Tensor:
        return self.product(theta[:-1]) + theta[-1]

    def penalty(self, theta: torch.Tensor) -> float:
        return 0.5 * self.alpha * float(theta[:-1].pow(2).sum())

    def gradient(self, theta: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        residual = self.loss.residual(probabilities)
        return torch.cat([self.product(residual) + self.alpha * theta[:-1], residual.sum(0, keepdim=True)])

    def hessian_product(self, direction: torch.Tensor, probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``H d`` at ``probabilities``, and the logits of ``d`` (``K d_W + d_b``) computed on the way."""
        logits = self.logits(direction)
        curvature = self.loss.hessian_product(probabilities, logits)
        return torch.cat([self.product(curvature) + self.alpha * direction[:-1], curvature.sum(0, keepdim=True)]), logits


class _Preconditioner:
    """An approximate inverse of the objective's Hessian in ``θ = [W; b]``.

    On ``U = [V 0; 0 1]``, the kernel's top eigenvectors and the bias, it is the exact Hessian at the
    current probabilities (``[V Λ, 1]``, which stands for ``K V`` and the bias, are the logits of ``U``);
    on the rest of the space the curvature is ``α`` plus at most the loss's curvature along the
    smallest kept eigenvalue.
    """

    def __init__(self, basis: torch.Tensor, eigenvalues: torch.Tensor, objective: _Objective, probabilities: torch.Tensor):
        size, rank = basis.shape
        outputs, alpha = probabilities.shape[1], objective.alpha
        self.basis = torch.block_diag(basis, basis.new_ones(1, 1))
        design = torch.cat([basis * eigenvalues, basis.new_ones(size, 1)], 1)
        hessian = objective.loss.subspace_hessian(probabilities, design)
        hessian.diagonal()[: rank * outputs] += alpha
        if objective.loss.multinomial:  # shifting every bias equally changes no probability: give that direction curvature
            bias_block = hessian[rank * outputs :, rank * outputs :]
            bias_block += (float(bias_block.diagonal().mean()) + alpha) / outputs
        self.factor = _cholesky(hessian)
        self.alpha = alpha
        self.tail = alpha + objective.loss.mean_curvature(probabilities) * float(eigenvalues[-1]) ** 2 / size

    def __call__(self, gradient: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The preconditioned gradient, and ``gᵀ H⁻¹ g`` estimated with ``α`` as the rest's curvature
        (an upper estimate there): twice the estimated distance to the optimum's objective."""
        top = self.basis.T @ gradient
        solution = torch.cholesky_solve(top.reshape(-1, 1), self.factor).reshape(top.shape)
        rest = gradient - self.basis @ top
        decrement = float((top * solution).sum()) + float(rest.pow(2).sum()) / self.alpha
        return self.basis @ solution + rest / self.tail, decrement


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of a symmetric positive (semi)definite matrix, with the smallest diagonal
    jitter that makes rounding errors harmless."""
    if not all_finite(matrix):
        raise FloatingPointError("The surrogate's Hessian holds NaN or inf: the kernel or the starting point is not finite.")
    scale = float(matrix.diagonal().abs().max())
    jitter = 0.0
    identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for _ in range(64):  # from 1e-14 of the diagonal up: far above it, any symmetric matrix is positive definite
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * identity)
        if info == 0:
            return factor
        jitter = max(10 * jitter, max(scale, torch.finfo(matrix.dtype).tiny) * 1e-14)
    raise FloatingPointError("No Cholesky factor of the surrogate's Hessian: it is not symmetric.")


@dataclass
class Curvature:
    """The surrogate's objective around its optimum, as counterfactual attribution needs it (see
    :func:`lightning_ntk.attribution.attribute`); kept from the fit's last step, so that attribution costs
    no pass over the training kernel.

    ``basis`` ``[N, r]`` and ``eigenvalues`` ``[r]``: the training kernel's top eigenpairs (those the solver
    found, ``preconditioner_rank`` of them);
    ``hessian_factor``: the Cholesky factor of the objective's Hessian on ``[basis, bias] ⊗ outputs``
    (``[(r + 1)·C]²``, width-major, as :meth:`_CrossEntropy.subspace_hessian` lays it out); ``residuals``
    ``[N, C]``: each training example's loss gradient with respect to its logits (class-weighted for
    ``ovr``); ``losses`` ``[N]``: its loss; ``kernel_diagonal`` ``[N]``: ``κ(x_j, x_j)``. Elsewhere than on
    the basis, the Hessian is taken as ``α``.
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    hessian_factor: torch.Tensor
    residuals: torch.Tensor
    losses: torch.Tensor
    kernel_diagonal: torch.Tensor

    def unscaled(self, scale: float) -> "Curvature":
        """This curvature, computed on the kernel divided by ``scale``, for the kernel itself: the weights
        ``W`` are the solver's divided by ``scale``, so the Hessian's rows and columns on the basis are
        multiplied by it (and so are its Cholesky factor's rows)."""
        factor = self.hessian_factor.clone()
        factor[: self.basis.shape[1] * self.residuals.shape[1]] *= scale
        return Curvature(self.basis, self.eigenvalues * scale, factor, self.residuals, self.losses, self.kernel_diagonal * scale)

    def to(self, device: str | torch.device) -> "Curvature":
        return Curvature(*(getattr(self, f.name).to(device) for f in fields(self)))

    def state(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _newton_step(
    objective: _Objective, probabilities: torch.Tensor, preconditioner: _Preconditioner, gradient: torch.Tensor,
    direction: torch.Tensor, forcing: float, max_cg: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Newton step ``d`` solving ``H d = −g`` to the relative accuracy ``forcing`` by preconditioned
    conjugate gradients started from the preconditioned gradient ``direction``; and its logits,
    accumulated from the products the iterations compute anyway."""
    residual, search = -gradient, -direction
    step, logit_step = torch.zeros_like(gradient), 0.0
    energy = start_energy = float((residual * search).sum())
    for _ in range(max_cg):
        product, search_logits = objective.hessian_product(search, probabilities)
        along = float((search * product).sum())
        if along <= 0:  # only rounding errors are left
            break
        length = energy / along
        step, logit_step, residual = step + length * search, logit_step + length * search_logits, residual - length * product
        preconditioned, _ = preconditioner(residual)
        new_energy = float((residual * preconditioned).sum())
        if new_energy <= forcing**2 * start_energy:
            break
        search, energy = preconditioned + new_energy / energy * search, new_energy
    return step, logit_step


def _line_search(objective: _Objective, logits, logit_step, theta, step, slope: float, trials: int = 20) -> float:
    """The length ``t`` minimising the objective along ``step``, by safeguarded Newton iterations on its
    derivative: each trial costs one evaluation of the loss, no kernel product."""
    loss, alpha = objective.loss, objective.alpha
    weight_dot, step_norm2 = float((theta[:-1] * step[:-1]).sum()), float(step[:-1].pow(2).sum())
    low, high, length = 0.0, math.inf, 1.0
    for _ in range(trials):
        _, probabilities = loss(logits + length * logit_step)
        derivative = float((loss.residual(probabilities) * logit_step).sum()) + alpha * (weight_dot + length * step_norm2)
        if abs(derivative) <= 1e-3 * abs(slope):
            break
        if derivative > 0:
            high = length
        else:
            low = length
        curvature = float((logit_step * loss.hessian_product(probabilities, logit_step)).sum()) + alpha * step_norm2
        newton = length - derivative / curvature if curvature > 0 else math.inf
        length = newton if low < newton < high else (2 * length if high == math.inf else 0.5 * (low + high))
    return length


def _solve(
    objective: _Objective,
    theta: torch.Tensor,
    *,
    tolerance: float,
    max_iter: int,
    rank: int,
    progress: Callable[[int, float], None] | None,
    max_cg: int = 50,
) -> tuple[torch.Tensor, list[float], dict[str, Any], Curvature]:
    """Minimise the objective from ``θ = [W; b]`` by preconditioned Newton-CG. Returns the solution,
    the objective at each iterate, the fit record and the curvature at the solution."""
    kernel, loss = objective.kernel, objective.loss
    top_basis, top_eigenvalues = _top_eigenpairs(kernel, rank)
    # directions whose loss curvature (≤ λ²/N) stays below α need no special treatment by the solver
    useful = top_eigenvalues.square() >= objective.alpha * kernel.size
    useful[0] = True
    basis, eigenvalues = top_basis[:, useful], top_eigenvalues[useful]

    zero = torch.zeros_like(theta)
    zero_value, zero_probabilities = loss(zero[:-1])
    start_gradient = float(objective.gradient(zero, zero_probabilities).norm())  # the scale of the reported gradient norm
    logits, warm = zero[:-1], False
    if theta.any():
        start_logits = objective.logits(theta)
        # a start worse than none (e.g. another kernel's solution, confidently wrong on this one) is dropped:
        # its saturated probabilities leave the loss almost no curvature to take Newton steps with
        warm = all_finite(start_logits) and float(loss(start_logits)[0]) + objective.penalty(theta) < float(zero_value)
        theta, logits = (theta, start_logits) if warm else (zero, zero[:-1])

    def evaluate(theta: torch.Tensor, logits: torch.Tensor):
        """The objective, probabilities, gradient, preconditioner, preconditioned gradient and gap at an iterate."""
        value, probabilities = loss(logits)
        gradient = objective.gradient(theta, probabilities)
        value = float(value) + objective.penalty(theta)
        preconditioner = _Preconditioner(basis, eigenvalues, objective, probabilities)
        direction, decrement = preconditioner(gradient)
        return value, probabilities, gradient, preconditioner, direction, 0.5 * decrement / abs(value)

    history: list[float] = []
    gaps: list[float] = []
    refined_at, stop = None, "max_iter"
    refinable = kernel.values.dtype != torch.float64
    for iteration in range(max_iter + 1):
        if objective.precise:  # free of the rounding that steps taken in the kernel's precision accumulate
            logits = objective.logits(theta)
        value, probabilities, gradient, preconditioner, direction, gap = evaluate(theta, logits)
        if gap > tolerance and refinable and not objective.precise and _stalled(gaps + [gap]):
            # float32 products put a floor under the gap (about ‖rounding‖²/α): from here on every kernel
            # product accumulates in float64, and the Newton steps converge as on a float64 kernel
            objective.precise, refined_at = True, iteration
            logits = objective.logits(theta)
            value, probabilities, gradient, preconditioner, direction, gap = evaluate(theta, logits)
        history.append(value)
        gaps.append(gap)
        if progress is not None:
            progress(iteration, value)
        if gap <= tolerance:
            stop = "converged"
            break
        if iteration == max_iter:
            break
        if len(gaps) > 3 and min(gaps[-3:]) >= gaps[-4] and (objective.precise or not refinable):
            stop = "stalled"  # three steps without progress at float64 accumulation: rounding sets the gap
            break
        step, logit_step = _newton_step(objective, probabilities, preconditioner, gradient, direction, min(0.5, math.sqrt(gap)), max_cg)
        slope = float((gradient * step).sum())
        if not slope < 0:  # rounding errors dominate the gradient: no descent direction is left
            stop = "no_descent"
            break
        length = _line_search(objective, logits, logit_step, theta, step, slope)
        new_theta, new_logits = theta + length * step, logits + length * logit_step
        if not (all_finite(new_theta) and all_finite(new_logits)):
            stop = "non_finite"
            break
        theta, logits = new_theta, new_logits

    # the final objective with float64 accumulation (the iterates' logits carry the kernel's rounding)
    losses, probabilities = loss.per_example(kernel.exact(theta[:-1]) + theta[-1])
    history[-1] = float(losses.mean()) + objective.penalty(theta)
    curvature = Curvature(  # on every eigenvector found: attribution needs those of small eigenvalues too
        top_basis, top_eigenvalues, _Preconditioner(top_basis, top_eigenvalues, objective, probabilities).factor,
        loss.residual(probabilities) * kernel.size, losses, kernel.diagonal(),
    )
    record = {
        "objective": history[-1],
        "iterations": len(history) - 1,
        "gap": gap,
        "gradient_norm": float(gradient.norm()) / start_gradient,
        "converged": gap <= tolerance,
        "kernel_passes": kernel.passes,
        "rank": int(eigenvalues.numel()),
        "warm_start": warm,
        "precision": "float64" if objective.precise or not refinable else "float32",
        "refined_at": refined_at,
        "stalled": stop == "stalled",
        "stop": stop,
        "warning": _convergence_warning(stop, gaps, tolerance),
    }
    return theta, history, record, curvature


def _convergence_warning(stop: str, gaps: list[float], tolerance: float) -> str:
    """Why a fit stopped short of its tolerance and what would help, in words (empty once converged)."""
    if stop == "converged":
        return ""
    steps, gap = len(gaps) - 1, gaps[-1]
    head = f"the surrogate's fit did not converge: after {steps} Newton step(s) its estimated gap to the optimum is {gap:.2g} (tolerance {tolerance:g})"
    if stop == "stalled":
        return (f"{head}, and it stopped shrinking: the data's rounding allows no less. The fit is as close as it gets; "
                f"a tolerance of {10 * gap:.0e} accepts it.")
    if stop == "max_iter":
        recent = gaps[max(0, len(gaps) - 4)]
        if steps < 5 or gap < 1e-2 * recent:  # too few steps to judge (a fit takes about ten), or still shrinking as near the optimum
            return f"{head}: raise max_iter (SurrogateConfig max_iter; a fit takes about ten steps)."
        return (f"{head}, shrinking slowly (from {recent:.2g} over the last {min(3, steps)} steps): the problem is badly conditioned "
                "at this alpha. Raise alpha (SurrogateConfig alpha, e.g. tenfold); more max_iter would cost much for little.")
    cause = "rounding left no descent direction" if stop == "no_descent" else "a Newton step overflowed"
    return f"{head}: {cause}. Check the kernel for huge or NaN-like values, or raise alpha (SurrogateConfig alpha)."


def _stalled(gaps: list[float]) -> bool:
    """Whether the last Newton step, taken close to the optimum (where each step shrinks the estimated gap by
    orders of magnitude), shrank it less than tenfold: rounding errors, not the problem, set the gap there."""
    return len(gaps) >= 2 and gaps[-2] < 1e-4 and gaps[-1] > 0.1 * gaps[-2]


class KernelSurrogate(L.LightningModule):
    """Kernel general linear model over ``num_train`` training points with ``num_outputs`` logits.

    ``formulation="multinomial"`` (default): softmax cross-entropy. ``"ovr"``: the paper's one-vs-rest
    logistic regressions with sklearn's ``class_weight="balanced"`` weighting, i.e. the objective of
    ``SGDClassifier(loss="log_loss", class_weight="balanced")``: in the binary problem of class c,
    positives weigh ``N / (classes·N_c)`` and negatives 1 (for a single logit, each class its own weight).
    The weights come from :meth:`balance_classes`, which the ``fit_*`` functions call.
    A single-logit binary network gets a single-logit surrogate (``num_outputs=1``, binary cross-entropy).

    The ``fit_*`` functions fit it (no ``Trainer`` needed). Under a ``Trainer``, ``predict``/``test``
    batches hold what :meth:`predict` takes (kernel rows ``[B, num_train]``), or query features for a
    surrogate fitted with :func:`fit_from_features`; ``test`` batches add the labels.

    ``normalized`` records whether the training kernel was cosine-normalised (``None``: unknown):
    rows that cannot come from such a kernel (``|κ| > 1``) are then refused. ``spec`` is the
    :class:`FeatureSpec` of the training kernel's features, checked against queries that state theirs.

    After fitting, ``history`` holds the training objective at each solver iterate, ``converged``
    whether the stopping tolerance was met, ``fit_record`` the final objective, iterations,
    optimality measures and cost (see :func:`fit_from_kernel`), and ``curvature`` the objective around
    its optimum (:class:`Curvature`, for counterfactual attribution); checkpoints keep all four.
    """

    def __init__(
        self,
        num_train: int,
        num_outputs: int,
        alpha: float = 1e-4,
        formulation: str = "multinomial",
        normalized: bool | None = None,
        feature_shape: tuple[int, ...] | None = None,
        spec: dict | None = None,
        kernel_scale: float = 1.0,
        shard_rows: int | None = None,
    ):
        super().__init__()
        check_choice("formulation", formulation, FORMULATIONS)
        check_alpha(alpha)
        if not (math.isfinite(kernel_scale) and kernel_scale > 0):
            raise ValueError(f"kernel_scale must be a finite number > 0 (the kernel's mean diagonal), got {kernel_scale!r}.")
        if num_train <= 0 or num_outputs <= 0:
            raise ValueError(f"num_train and num_outputs must be positive, got {num_train} and {num_outputs}.")
        self.save_hyperparameters()
        self.weight = torch.nn.Parameter(torch.zeros(num_outputs, num_train))
        self.bias = torch.nn.Parameter(torch.zeros(num_outputs))
        self.register_buffer("class_weights", torch.ones(max(2, num_outputs), dtype=torch.float64))
        rows = num_train if shard_rows is None else shard_rows  # a shard's rows (see fit_from_features' shard)
        features = None if feature_shape is None else torch.zeros(rows, int(np.prod(feature_shape)))
        self.register_buffer("train_features", features)  # unit-norm (if normalized) flattened training features
        self._rows: UnitRows | None = None  # instead, when they are read in blocks from where they are stored
        self.spec = FeatureSpec(**spec) if spec is not None else None
        self.history: list[float] = []
        self.fit_record: dict[str, Any] = {}
        self.curvature: Curvature | None = None  # set by the fit
        self.shard: Shard | None = None  # the rows of train_features, when they are this rank's shard

    @property
    def feature_rows(self) -> torch.Tensor | UnitRows | None:
        """The training features as the fit used them (flattened, unit-norm if normalised), sliced by rows: held in
        memory (``train_features``), or read in blocks from their array (:func:`fit_from_features` with
        ``block_size``); None for a surrogate fitted from a kernel matrix."""
        return self._rows if self._rows is not None else self.train_features

    @property
    def penalty(self) -> float:
        """The L2 penalty on ``W`` against the kernel in its own units: ``α·kernel_scale²`` (α on the kernel
        divided by its mean diagonal)."""
        return float(self.hparams.alpha) * float(self.hparams.kernel_scale) ** 2

    @property
    def converged(self) -> bool:
        """Whether the last fit met its stopping tolerance."""
        return bool(self.fit_record.get("converged", False))

    def balance_classes(self, labels: torch.Tensor) -> None:
        """Set the one-vs-rest class weights ``N / (classes·N_c)`` from all training labels."""
        counts = torch.bincount(labels, minlength=self.class_weights.numel()).double()
        self.class_weights.copy_(labels.numel() / (counts.numel() * counts.clamp_min(1)))

    def _cross_entropy(self, labels: torch.Tensor) -> _CrossEntropy:
        return _CrossEntropy(labels, self.hparams.num_outputs, self.hparams.formulation, self.class_weights)

    # -- model -------------------------------------------------------------------------------------
    def _check_width(self, kernel_rows: torch.Tensor) -> None:
        if kernel_rows.ndim != 2 or kernel_rows.shape[1] != self.hparams.num_train:
            raise ValueError(
                f"Kernel rows must be [M, {self.hparams.num_train}] (one column per training point the surrogate "
                f"was fitted on), got {tuple(kernel_rows.shape)}."
            )

    def forward(self, kernel_rows: torch.Tensor) -> torch.Tensor:
        self._check_width(kernel_rows)
        return kernel_rows.to(self.weight.dtype) @ self.weight.T + self.bias

    def _feature_logits(self, unit_query: torch.Tensor) -> torch.Tensor:
        """``W κ(q, X)ᵀ + b`` as ``q (Φᵀ Wᵀ) + b``: no kernel row is formed. With sharded features, ``Φᵀ Wᵀ`` is
        the sum of the ranks' ``Φ_rᵀ W_rᵀ`` (one all-reduce of ``[F, C]``): a collective, every rank calls it."""
        rows = self.feature_rows
        if isinstance(rows, UnitRows):
            folded = sum(rows[block].to(self.weight.dtype).T @ self.weight[:, block].T for block in rows.blocks())
        elif self.shard is None:
            folded = rows.T @ self.weight.T
        else:
            folded = self.shard.all_reduce(rows.T @ self.weight[:, self.shard.rows.to(self.weight.device)].T)
        return unit_query.to(self.weight.dtype) @ folded + self.bias

    # -- Lightning ---------------------------------------------------------------------------------
    def _batch_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.feature_rows is not None:
            return self._feature_logits(self.unit_query_features(inputs))
        self.check_kernel_rows(inputs)
        return self(inputs)

    def predict_step(self, batch, batch_idx: int = 0) -> torch.Tensor:
        return self._batch_logits(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def test_step(self, batch, batch_idx: int = 0) -> None:
        inputs, labels = batch
        logits = self._batch_logits(inputs)
        value, _ = self._cross_entropy(labels)(logits.double())
        self.log("surrogate/test_loss", float(value), batch_size=len(labels))
        self.log("surrogate/test_acc", (predictions(logits) == labels).float().mean(), batch_size=len(labels))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._rows is not None:  # features read in blocks are gathered here, so that the checkpoint holds them like any other
            checkpoint["state_dict"]["train_features"] = torch.cat([self._rows[block].cpu() for block in self._rows.blocks()])
        curvature = None if self.curvature is None else self.curvature.state()
        checkpoint["surrogate_fit"] = {"history": list(self.history), "record": dict(self.fit_record), "curvature": curvature}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fit = checkpoint.get("surrogate_fit", {})
        self.history, self.fit_record = list(fit.get("history", [])), dict(fit.get("record", {}))
        self.curvature = Curvature(**fit["curvature"]) if fit.get("curvature") is not None else None

    # -- inference ---------------------------------------------------------------------------------
    def check_kernel_rows(self, kernel_rows: torch.Tensor, spec: FeatureSpec | None = None) -> None:
        """Refuse rows that cannot come from the training kernel: wrong width, NaN, a normalisation or
        a feature spec other than the training kernel's."""
        self._check_width(kernel_rows)
        check_finite(kernel_rows, "test kernel")
        peak = float(kernel_rows.abs().max()) if kernel_rows.numel() else 0.0
        if self.hparams.normalized and peak > 1 + NORMALISED_TOLERANCE:
            raise ValueError(
                f"The surrogate was fitted on a cosine-normalised kernel (|κ| ≤ 1), but these rows reach {peak:.4g}: "
                "build the test kernel with the same normalisation (kernel_from_features(..., normalize=True))."
            )
        self._check_spec(spec)

    def _check_spec(self, spec: FeatureSpec | None) -> None:
        if spec is None or self.spec is None or spec == self.spec:
            return
        train, query = self.spec.to_dict(), spec.to_dict()
        differing = ", ".join(f"{k}: {query[k]!r} (training: {train[k]!r})" for k in train if train[k] != query[k])
        raise ValueError(
            f"The query was computed differently from the training features ({differing}). Featurize both sets with "
            "the same network state, kernel kind, projection_dim, projector and seed."
        )

    @torch.no_grad()
    def predict(self, kernel_rows: Any, spec: FeatureSpec | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
        """Logits ``[M, num_outputs]`` for test×train kernel rows built like the training kernel
        (a tensor or numpy array, memmaps included, read ``block_size`` rows at a time)."""
        blocks = []
        for start in range(0, max(1, kernel_rows.shape[0]), block_size):
            rows = as_tensor(kernel_rows[start : start + block_size])
            self.check_kernel_rows(rows, spec)
            blocks.append(self(rows.to(self.weight.device)).cpu())
        return torch.cat(blocks)

    def unit_query_features(self, query_features: Any, spec: FeatureSpec | None = None) -> torch.Tensor:
        """Query features flattened and normalised as the training features were, after checking that
        they were computed the same way."""
        if self.feature_rows is None:
            raise ValueError("This surrogate was fitted from a kernel matrix, not features: pass kernel rows to predict().")
        self._check_spec(spec)
        expected = tuple(self.hparams.feature_shape)
        if tuple(query_features.shape[1:]) != expected:
            raise ValueError(
                f"Query features have per-example shape {tuple(query_features.shape[1:])}, the training features "
                f"{expected}: compute both with the same kernel kind, number of classes and projection_dim."
            )
        return flat_unit_features(query_features, bool(self.hparams.normalized)).to(self.weight.device)

    @torch.no_grad()
    def predict_from_features(self, query_features: Any, spec: FeatureSpec | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
        """Logits for query features ``[M, C, K]`` / ``[M, K]``, normalised as in training; the kernel rows
        against the stored training features are folded into one ``[C·K, num_outputs]`` product."""
        blocks = [
            self._feature_logits(self.unit_query_features(query_features[start : start + block_size], spec)).cpu()
            for start in range(0, max(1, query_features.shape[0]), block_size)
        ]
        return torch.cat(blocks)


def check_several_classes(labels: torch.Tensor) -> None:
    """Refuse training labels of one class: the fit would have no minimum."""
    if labels.unique().numel() < 2:
        raise LabelError(
            f"All {labels.numel()} training labels are {int(labels[0])}: a classifier needs examples of at least two classes "
            "(with one, its objective has no minimum). Fit on a training subset that holds several classes."
        )


def _labels(train_labels: Any, num_train: int, num_outputs: int | None) -> tuple[torch.Tensor, int]:
    labels = as_tensor(train_labels).flatten()
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise LabelError(f"Labels must be integer class indices, got {labels.dtype}.")
    labels = labels.long()
    if labels.numel() != num_train:
        raise LabelError(
            f"Got {labels.numel()} labels for {num_train} training points: pass one label per row of the training kernel/features."
        )
    if labels.min() < 0:
        raise LabelError(f"Labels must be class indices ≥ 0, got {int(labels.min())}.")
    check_several_classes(labels)
    classes = int(labels.max()) + 1
    outputs = num_outputs if num_outputs is not None else max(classes, 2)
    limit = 2 if outputs == 1 else outputs
    if classes > limit:
        raise ValueError(
            f"Labels go up to {classes - 1}, but the surrogate has {outputs} output(s) ({limit} classes): "
            "pass num_outputs equal to the network's number of logits."
        )
    return labels, outputs


def _solve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _fit(
    surrogate: KernelSurrogate,
    values: torch.Tensor,
    factored: bool,
    labels: torch.Tensor,
    init: KernelSurrogate | None,
    device: str | torch.device,
    tolerance: float,
    max_iter: int,
    preconditioner_rank: int,
    progress: Callable[[int, float], None] | None,
    shard: Shard | None = None,
) -> KernelSurrogate:
    check_solver_options(tolerance, max_iter)
    check_count("preconditioner_rank", preconditioner_rank, allow_none=False)
    solve_on = _solve_device(device)
    surrogate.balance_classes(labels)
    scale = float(surrogate.hparams.kernel_scale)
    loss = _CrossEntropy(labels.to(solve_on), surrogate.hparams.num_outputs, surrogate.hparams.formulation, surrogate.class_weights)
    kernel = _KernelOperator(values.to(solve_on), factored, scale) if shard is None else _ShardedKernelOperator(values.to(solve_on), shard, scale)
    objective = _Objective(kernel, loss, surrogate.hparams.alpha)
    warm = init is not None and tuple(init.weight.shape) == tuple(surrogate.weight.shape)
    start = init if warm else surrogate
    # the solver's unknowns are the weights on the scaled kernel K / scale: W·scale
    theta = torch.cat([start.weight.detach().T * scale, start.bias.detach()[None]]).to(solve_on, torch.float64)
    theta, history, record, curvature = _solve(objective, theta, tolerance=tolerance, max_iter=max_iter, rank=preconditioner_rank, progress=progress)
    if values.dtype == torch.float64:  # float64 data gives a float64 surrogate
        surrogate.double()
    with torch.no_grad():
        surrogate.weight.copy_(theta[:-1].T / scale)
        surrogate.bias.copy_(theta[-1])
    surrogate.history, surrogate.fit_record = history, {**record, "kernel_scale": scale}
    surrogate.curvature = curvature.unscaled(scale).to("cpu")
    return surrogate


def _kernel_scale(diagonal: torch.Tensor, normalized: bool) -> float:
    """The unit the fit measures the kernel in: 1 for a cosine-normalised kernel, else its mean diagonal
    (1 for a kernel that is zero, whose fit is the class frequencies)."""
    mean = float(diagonal.double().mean())
    return 1.0 if normalized or not mean > 0 else mean


def _check_kernel(kernel: torch.Tensor, block_elements: int = 1 << 24) -> None:
    """Refuse a training kernel that is clearly not symmetric, or has a negative diagonal entry: no Gram
    matrix of features does (a negative eigenvalue is found by the solver's first passes). One pass, in row blocks."""
    rows = max(1, block_elements // kernel.shape[0])
    difference = norm = 0.0
    for start in range(0, kernel.shape[0], rows):
        block = kernel[start : start + rows].double()
        difference += float((block - kernel[:, start : start + rows].T.double()).pow(2).sum())
        norm += float(block.pow(2).sum())
    if difference > ASYMMETRY_TOLERANCE**2 * norm:
        raise ValueError(
            f"The training kernel is not symmetric (‖K − Kᵀ‖ is {math.sqrt(difference / norm):.3g} of ‖K‖): a kernel has κ(x, x') = κ(x', x). "
            "Pass the train×train kernel (kernel_from_features(train_features)), not a test×train block or a transposed product."
        )
    diagonal = kernel.diagonal()
    if float(diagonal.min()) < -1e-6 * float(diagonal.abs().max()):
        raise ValueError(
            f"The training kernel has a negative diagonal entry ({float(diagonal.min()):.4g}), so it is not positive semidefinite "
            "(κ(x, x) = ‖φ(x)‖² ≥ 0). Build it with kernel_from_features or exact_kernel, or pass a similarity that is a kernel."
        )


def fit_from_kernel(
    train_kernel: Any,
    train_labels: Any,
    *,
    num_outputs: int | None = None,
    alpha: float = 1e-4,
    formulation: str = "multinomial",
    spec: FeatureSpec | None = None,
    init: KernelSurrogate | None = None,
    tolerance: float = 1e-9,
    max_iter: int = 100,
    preconditioner_rank: int = 64,
    progress: Callable[[int, float], None] | None = None,
    device: str | torch.device = "auto",
) -> KernelSurrogate:
    """Fit a surrogate on a precomputed ``[N, N]`` training kernel.

    ``num_outputs`` defaults to the number of classes in the labels (at least 2); pass 1 for a
    single-logit binary network. Whether the kernel is cosine-normalised is read off its diagonal and
    enforced on test rows. The kernel must be symmetric and positive semidefinite (a Gram matrix of
    features); one that clearly is not is refused. ``alpha`` penalises ``W`` against the kernel divided by
    its mean diagonal (see the module's docstring): ``k`` and ``k * 1e5`` give the same logits. A float64 kernel gives a float64 surrogate; float32 and float64 kernels reach
    the same optimum.

    The solver (see the module's docstring) stops once the estimated distance of the objective to its
    optimum, relative to the objective, is at most ``tolerance``, or after ``max_iter`` Newton steps.
    ``init``: a previous surrogate over the same number of training points to start from (its ``W`` and
    ``b``), e.g. the last fit on a slightly different kernel; another shape starts from zero.
    ``preconditioner_rank``: how many of the kernel's top eigenvectors the preconditioner treats exactly.
    ``progress(iteration, objective)`` is called at every iterate. ``device``: where to solve
    (``"auto"``: a CUDA GPU when available); the surrogate is returned on the CPU.

    ``fit_record`` holds ``objective`` (the final objective, accumulated in float64), ``iterations``,
    ``gap`` (the estimated relative distance to the optimum's objective, from the Newton decrement),
    ``gradient_norm`` (relative to the gradient at ``W = 0, b = 0``), ``converged`` (``gap ≤ tolerance``),
    ``kernel_passes`` (products with the kernel, the bulk of the cost), ``rank`` (eigenvectors used),
    ``warm_start`` (whether ``init`` was used: a start whose objective is above that of zero weights is
    dropped, e.g. a previous solution that is confidently wrong on a kernel that changed much),
    ``precision`` (``"float64"`` when the last steps' kernel products accumulated in float64),
    ``refined_at`` (the step from which a float32 kernel's products were accumulated in float64, because
    their rounding had stopped the gap from shrinking; None if never) and ``stalled`` (the gap stopped
    shrinking even in float64: the tolerance is below what the data's rounding allows), ``stop`` (why the
    solver stopped: ``"converged"``, ``"max_iter"``, ``"stalled"``, ``"no_descent"`` or ``"non_finite"``),
    ``warning`` (empty once converged, else why and what would help) and ``kernel_scale`` (``κ̄``).
    """
    train_kernel = _fitting_tensor(train_kernel)
    if train_kernel.ndim != 2 or train_kernel.shape[0] != train_kernel.shape[1] or train_kernel.shape[0] == 0:
        raise ValueError(f"The training kernel must be a square [N, N] matrix, got {tuple(train_kernel.shape)}.")
    check_finite(train_kernel, "training kernel")
    _check_kernel(train_kernel)
    labels, outputs = _labels(train_labels, train_kernel.shape[0], num_outputs)
    diagonal = train_kernel.diagonal()
    normalized = bool(
        (diagonal - 1).abs().max() <= NORMALISED_TOLERANCE and train_kernel.abs().max() <= 1 + NORMALISED_TOLERANCE
    )
    surrogate = KernelSurrogate(
        train_kernel.shape[0], outputs, alpha, formulation, normalized=normalized, spec=spec.to_dict() if spec is not None else None,
        kernel_scale=_kernel_scale(diagonal, normalized),
    )
    return _fit(surrogate, train_kernel, False, labels, init, device, tolerance, max_iter, preconditioner_rank, progress)


def fit_from_features(
    train_features: Any,
    train_labels: Any,
    *,
    normalize: bool = True,
    spec: FeatureSpec | None = None,
    num_outputs: int | None = None,
    alpha: float = 1e-4,
    formulation: str = "multinomial",
    init: KernelSurrogate | None = None,
    tolerance: float = 1e-9,
    max_iter: int = 100,
    preconditioner_rank: int = 64,
    progress: Callable[[int, float], None] | None = None,
    device: str | torch.device = "auto",
    shard: Shard | None = None,
    block_size: int | None = None,
) -> KernelSurrogate:
    """Fit a surrogate on the kernel of training features ``[N, C, K]`` or ``[N, K]`` (a tensor or a
    numpy array, memmaps included) without forming it: memory ``O(N·C·K)``. ``normalize`` chooses the
    cosine-normalised kernel (trNTK, pNTK) or the raw one (trNTK⁰). The surrogate keeps the
    (normalised) features; query logits then come from :meth:`KernelSurrogate.predict_from_features`,
    which refuses queries whose ``spec`` differs. Other arguments as in :func:`fit_from_kernel`.

    ``shard``: the features are this rank's rows ``shard.rows`` of the training set (:class:`Shard`), and the
    labels are all ``N`` of them. Every rank of the shard's group calls this at once; the kernel's products are
    collectives (:class:`_ShardedKernelOperator`), every rank solves the same problem and returns the same
    weights, curvature and record, and each surrogate keeps only its rank's features (``surrogate.shard``), so
    that no rank holds all of them. The result equals the fit on all the rows in one process.

    ``block_size``: read the features that many rows at a time at every kernel product, normalising each
    block on the fly (:class:`~lightning_ntk.kernels.UnitRows`), instead of holding a normalised copy: the
    memory of stored features that are memory-mapped is then the page cache's, and the surrogate keeps a
    reference to the array (it must stay readable as long as the surrogate is used with features). The
    solution is the same as in memory (to rounding: float32 products are summed in another order).
    """
    if len(getattr(train_features, "shape", ())) not in (2, 3) or train_features.shape[0] == 0:
        raise ValueError(
            f"Training features must be a non-empty [N, K] or [N, C, K] array, got shape {getattr(train_features, 'shape', None)}."
        )
    num_train = train_features.shape[0] if shard is None else shard.num_train
    if shard is not None:  # told on every rank, so that none is left waiting in the fit's collectives
        wrong = int(shard.all_reduce(torch.tensor([len(shard.rows) != train_features.shape[0]], dtype=torch.long)))
        if wrong:
            raise ValueError(
                f"{wrong} rank(s) got other rows of features than their shard holds (this rank: {len(shard.rows)} rows in its shard, "
                f"{train_features.shape[0]} rows of features): pass each rank the features of its shard.rows."
            )
    labels, outputs = _labels(train_labels, num_train, num_outputs)
    if block_size is None:
        flat = flat_unit_features(train_features, normalize)
        diagonal = flat.double().pow(2).sum(1)
    else:
        check_count("block_size", block_size, allow_none=False)
        if shard is not None:
            raise ValueError("block_size= and shard= are not supported together yet: fit a shard from its features in memory (block_size=None).")
        flat = UnitRows(train_features, normalize, block_size)
        check_finite(flat.norms, "feature array")  # a row's norm is finite exactly when its features are (short of overflow)
        diagonal = flat.norms.double().square()
    surrogate = KernelSurrogate(
        num_train, outputs, alpha, formulation, normalized=normalize,
        feature_shape=None if block_size is not None else tuple(train_features.shape[1:]), spec=spec.to_dict() if spec is not None else None,
        kernel_scale=_kernel_scale(diagonal if shard is None else shard.gather(diagonal), normalize), shard_rows=len(flat),
    )
    if block_size is None:
        surrogate.train_features, surrogate.shard = flat, shard
    else:  # recorded, but no buffer of the features' size is allocated: the rows are read where they are
        surrogate.hparams.feature_shape = tuple(train_features.shape[1:])
        surrogate._rows = flat
    return _fit(surrogate, flat, True, labels, init, device, tolerance, max_iter, preconditioner_rank, progress, shard)
