"""Kernel matrices as inner products of features, assembled in row blocks.

For trNTK features ``[N, C, K]`` the kernel ``Σ_c <φ_c(x), φ_c(x')>`` is the inner product of the
flattened ``C·K`` vectors, so every kind reduces to one matrix product per block. Cosine
normalisation divides by the square roots of each side's self-kernel, which are row norms and
never need the full ``N×N`` matrix.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .config import ProjectionConfig, SubsetConfig
from .featurize import embedding_features, gradient_features, stream_batches
from .jacobian import ParamSelection
from .blocks import Block, BlockKind
from .layers import LayerGradients, LayerSignals
from .projection import bfloat16_products
from .registry import Kernel, get_kernel, names
from .task import Task

DEFAULT_BLOCK_SIZE = 1024


def _exact(kind: str | Kernel) -> Kernel:
    kernel = get_kernel(kind)
    if kernel.projected:
        raise ValueError(
            f"{kernel.name!r} is a projected kernel; exact kernels are {names(projected=False)}. Projected kernels come "
            "from features: kernel_from_features(project_features(model, x, kind), ...)."
        )
    return kernel


def _factored(kernel: Kernel) -> bool:
    """Whether the kernel is a scalar gradient kernel, computable from per-layer signals."""
    return kernel.from_gradients and kernel.scalar


def as_tensor(values: Any) -> torch.Tensor:
    """A tensor view of ``values``; read-only arrays (memmaps opened with ``mode="r"``) are copied."""
    if isinstance(values, torch.Tensor):
        return values
    array = np.asarray(values)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (all-zero rows stay zero), so that ``U Uᵀ`` is the cosine kernel."""
    return rows / rows.norm(dim=1).clamp_min(torch.finfo(rows.dtype).tiny).unsqueeze(1)


def _flat(features: Any, rows: slice = slice(None)) -> torch.Tensor:
    """Rows of features as ``[n, C·K]``; half-precision storage is widened to float32 for accumulation."""
    block = as_tensor(features[rows])
    if block.dtype in (torch.float16, torch.bfloat16):
        block = block.float()
    return block.reshape(block.shape[0], -1)


def _unit_flat(features: Any, normalize: bool) -> torch.Tensor:
    """All rows of features as ``[N, C·K]``, scaled to unit norm for the cosine kernel."""
    flat = _flat(features)
    return unit_rows(flat) if normalize else flat


class UnitRows:
    """Features ``[N, C, K]`` / ``[N, K]`` (a tensor or an array, memmaps included) as flattened ``[N, C·K]`` rows,
    each scaled to unit norm when ``normalize``, read ``block_size`` rows at a time: the rows of the cosine
    kernel ``κ = Φ Φᵀ`` without a normalised copy of all of them (memory-mapped features stay on disk). The
    row norms are computed in one pass, here. Rows come in float64 for float64 features, else float32, and
    equal those of :func:`unit_rows` on the whole array."""

    def __init__(self, features: Any, normalize: bool, block_size: int = DEFAULT_BLOCK_SIZE, device: str | torch.device = "cpu"):
        self.features, self.normalize, self.block_size = features, normalize, block_size
        self.dtype = torch.float64 if as_tensor(features[:0]).dtype == torch.float64 else torch.float32
        self.shape = (features.shape[0], int(np.prod(features.shape[1:])))
        self.device = torch.device(device)
        self.norms = torch.cat([self._read(rows).norm(dim=1) for rows in self.blocks()])

    def __len__(self) -> int:
        return self.shape[0]

    def blocks(self) -> Iterator[slice]:
        return (slice(start, min(start + self.block_size, self.shape[0])) for start in range(0, self.shape[0], self.block_size))

    def _read(self, rows: slice) -> torch.Tensor:
        block = as_tensor(self.features[rows])
        return block.to(self.dtype).reshape(len(block), -1)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        block = self._read(rows)
        if self.normalize:
            block = block / self.norms[rows].clamp_min(torch.finfo(self.dtype).tiny).unsqueeze(1)
        return block.to(self.device)

    def to(self, device: str | torch.device) -> "UnitRows":
        """The same rows, each block moved to ``device`` once read."""
        moved = object.__new__(UnitRows)
        moved.__dict__.update(self.__dict__, device=torch.device(device))
        return moved


@contextlib.contextmanager
def _products_in(precision: str, values: torch.Tensor) -> Iterator[None]:
    """float32 matrix products on the CPU with bfloat16 inputs and float32 sums meanwhile (oneDNN), where
    ``precision`` asks for them (see :class:`~lightning_ntk.projection.SketchProjector`): the kernel of
    1,000 examples then takes a third of the time, and it is the Gram matrix of the rounded features
    (positive semi-definite as before), its entries within about 2e-4 of float32's, against the 3% by
    which the sketch itself moves them at K = 1,024."""
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if mkldnn_matmul is None or values.device.type != "cpu" or not bfloat16_products(precision, values.dtype, values.device):
        yield
        return
    previous = mkldnn_matmul.fp32_precision
    mkldnn_matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        mkldnn_matmul.fp32_precision = previous


def _check_features(features: Any, name: str) -> None:
    if features is None or len(features.shape) not in (2, 3):
        raise ValueError(f"{name} must be [N, K] or [N, C, K] features, got shape {getattr(features, 'shape', None)}.")
    if features.shape[0] == 0:
        raise ValueError(f"{name} holds no examples.")


def _check_pair(features_a: Any, features_b: Any) -> None:
    _check_features(features_a, "features_a")
    _check_features(features_b, "features_b")
    if features_a.shape[1:] != features_b.shape[1:]:
        raise ValueError(
            f"Cannot take a kernel between features of shapes {tuple(features_a.shape[1:])} and "
            f"{tuple(features_b.shape[1:])} per example: both sides need the same kind, classes and projection_dim."
        )


def kernel_blocks(
    features_a: Any,
    features_b: Any = None,
    normalize: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    product_precision: str = ProjectionConfig.product_precision,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, κ(A[rows], B))`` blocks of ``block_size`` rows of A against all of B.

    Features may be tensors or numpy arrays (memmaps included); only one block of A is in memory at a
    time (B is read whole). ``product_precision``: ``"auto"`` multiplies float32 features with bfloat16
    inputs and float32 sums on CPUs with bfloat16 matrix units (AMX), which suits projected features,
    whose own error is far larger (the default, :class:`~lightning_ntk.config.ProjectionConfig`'s);
    ``"float32"`` never does (exact kernels use it).
    """
    features_b = features_a if features_b is None else features_b
    _check_pair(features_a, features_b)
    b = _unit_flat(features_b, normalize)
    for start in range(0, features_a.shape[0], block_size):
        rows = slice(start, min(start + block_size, features_a.shape[0]))
        a = _flat(features_a, rows).to(b.dtype)
        if normalize:
            a = unit_rows(a)
        with _products_in(product_precision, b):
            block = a @ b.T
        yield rows, block


def kernel_from_features(
    features_a: Any, features_b: Any = None, normalize: bool = True, block_size: int = DEFAULT_BLOCK_SIZE, product_precision: str = ProjectionConfig.product_precision
) -> torch.Tensor:
    """``κ(A, B)`` as an ``[Na, Nb]`` matrix (``B = A`` when omitted).

    ``normalize=True`` gives the cosine-normalised kernel (trNTK, pNTK); ``False`` the raw one
    (trNTK⁰). For row blocks without the full matrix, use :func:`kernel_blocks`. ``κ(A, A)`` is
    symmetric: only the blocks on and below the diagonal are multiplied, the others mirrored (about half
    the work). ``B`` is read ``block_size`` rows at a time (see :class:`UnitRows`), ``A`` whole. ``product_precision`` as in :func:`kernel_blocks`.
    """
    if features_b is not None:  # B, the training side, is read block_size rows at a time
        _check_pair(features_a, features_b)
        b = UnitRows(features_b, normalize, block_size)
        a = _unit_flat(features_a, normalize).to(b.dtype)
        with _products_in(product_precision, a):
            return torch.cat([a @ b[columns].T for columns in b.blocks()], 1)
    _check_features(features_a, "features_a")
    flat = _unit_flat(features_a, normalize)
    n = flat.shape[0]
    out = flat.new_empty(n, n)
    with _products_in(product_precision, flat):
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            torch.mm(flat[start:stop], flat[:stop].T, out=out[start:stop, :stop])
            out[:start, start:stop] = out[start:stop, :start].T
    return out


def entk_from_features(features_a: torch.Tensor, features_b: torch.Tensor | None = None) -> torch.Tensor:
    """The full eNTK ``Θ[a, b, c, c'] = <g_c(x_a), g_c'(x_b)>`` from ``[N, C, P]`` gradients."""
    features_b = features_a if features_b is None else features_b
    return torch.einsum("acp,bdp->abcd", features_a, features_b)


def exact_kernel(
    model: nn.Module,
    inputs_a: Any,
    inputs_b: Any = None,
    kind: str = "trntk",
    *,
    params: ParamSelection = None,
    layers: Sequence[str] | None = None,
    task: Task | None = None,
    batch_size: int = SubsetConfig.batch_size,
    method: str = "auto",
) -> torch.Tensor:
    """The exact kernel between two sets of inputs (tensors or DataLoaders): ``[Na, Nb]``, or
    ``[Na, Nb, C, C]`` for ``kind="entk"``. ``B = A`` when ``inputs_b`` is omitted.

    Kinds: ``trntk`` (cosine-normalised trace NTK), ``trntk0`` (unnormalised), ``pntk``, ``entk``,
    ``em`` (outputs of ``layers``), ``ck`` (input of the last linear layer).

    ``method="factored"`` (the default for trntk/trntk0/pntk) computes the kernel from per-layer
    signals, :func:`factored_kernel`; ``"vmap"`` from all ``N·C·P`` per-example gradients held in
    memory (the only method for entk). Both give the same values.
    """
    kernel = _exact(kind)
    if method not in ("auto", "factored", "vmap"):
        raise ValueError(f"Unknown method {method!r}; choose 'auto', 'factored' or 'vmap'.")
    if method == "factored" and not _factored(kernel):
        raise ValueError(f"method='factored' computes the kernels trntk, trntk0 and pntk, not {kernel.name!r}; use method='auto'.")
    if method != "vmap" and _factored(kernel):
        return factored_kernel(model, inputs_a, inputs_b, kernel.name, params=params, task=task, batch_size=batch_size)
    if kernel.from_gradients:
        featurize = lambda data: gradient_features(model, data, kernel.name, params=params, task=task, batch_size=batch_size)  # noqa: E731
    else:
        featurize = lambda data: embedding_features(model, data, kernel.name, layers, task=task, batch_size=batch_size)  # noqa: E731
    features_a = featurize(inputs_a)
    features_b = None if inputs_b is None else featurize(inputs_b)
    if not kernel.scalar:
        return entk_from_features(features_a, features_b)
    return kernel_from_features(features_a, features_b, normalize=kernel.normalized, product_precision="float32")  # exact: no rounding


def factored_kernel(
    model: nn.Module,
    inputs_a: Any,
    inputs_b: Any = None,
    kind: str = "trntk",
    *,
    params: ParamSelection = None,
    task: Task | None = None,
    batch_size: int = SubsetConfig.batch_size,
) -> torch.Tensor:
    """The exact trNTK (``trntk``), trNTK⁰ (``trntk0``) or pNTK (``pntk``), ``[Na, Nb]``, from per-layer
    signals (:class:`~lightning_ntk.layers.LayerGradients`): ``Σ_c (δ_c·δ'_c)(a·a')`` for linear
    layers, summed over positions for convolutions, so per-example gradients are formed only for
    layers where that is cheaper (see :func:`gram_factors`).

    Memory: the signals of all of A and B.
    """
    kernel = _exact(kind)
    if not _factored(kernel):
        raise ValueError(f"The factored kernel exists for the scalar gradient kernels trntk, trntk0 and pntk, not {kernel.name!r}.")
    gradients = LayerGradients(model, params, task)
    summed = kernel.summed

    def collect(data):
        return list(stream_batches(model, data, lambda x: gram_factors(gradients(x, summed)), task, batch_size))

    batches_a = collect(inputs_a)
    batches_b = batches_a if inputs_b is None else collect(inputs_b)
    gram = torch.cat([torch.cat([signal_gram(a, b) for b in batches_b], dim=1) for a in batches_a]).detach().cpu()
    if not kernel.normalized:
        return gram

    def norms(batches):
        return torch.cat([signal_gram(s, s).diagonal() for s in batches]).detach().cpu().sqrt()

    norms_a = norms(batches_a)
    norms_b = norms_a if inputs_b is None else norms(batches_b)
    tiny = torch.finfo(gram.dtype).tiny
    return gram / norms_a.clamp_min(tiny)[:, None] / norms_b.clamp_min(tiny)[None, :]


# -- exact kernels from signals ------------------------------------------------------------------------


def gram_factors(signals: list[LayerSignals]) -> list[LayerSignals]:
    """The signals in the form that is cheaper for exact inner products, block by block.

    Linear-like blocks keep their factors (the Gram of a pair costs ``T·T'·(cols + C·rows)``); blocks
    whose positions make that dearer than the gradient itself (``C·rows·cols``), and normalisation
    blocks, are replaced by their formed per-example gradients, as ``flat`` blocks. The uses of a tied
    weight are replaced by one ``flat`` block of their summed gradients.
    """
    uses = Counter(sig.block.params for sig in signals)
    out, tied = [], {}
    for sig in signals:
        blk, classes = sig.block, sig.grads.shape[0]
        if uses[blk.params] > 1:
            keep = False
        elif blk.kind == BlockKind.OUTER:
            t = sig.inputs.shape[1]
            keep = t * t * (blk.groups * blk.cols + classes * blk.rows) <= classes * blk.rows * blk.cols
        else:
            keep = blk.kind != BlockKind.SCALE
        if keep:
            out.append(sig)
            continue
        grads = sig.matrix().flatten(2).transpose(0, 1)
        if blk.params in tied:
            tied[blk.params].grads = tied[blk.params].grads + grads
        else:
            flat = Block(blk.name, BlockKind.FLAT, blk.params, 1, blk.size, 1, blk.shapes, blk.module)
            out.append(LayerSignals(flat, None, grads))
            if uses[blk.params] > 1:
                tied[blk.params] = out[-1]
    return out


def signal_gram(signals_a: list[LayerSignals], signals_b: list[LayerSignals]) -> torch.Tensor:
    """``Σ_c <G_c(x), G_c(x')>`` between the examples of two batches, ``[Ba, Bb]``, summed over blocks:
    ``(δ·δ')(a·a')`` summed over positions for linear-like blocks, token matches for embeddings."""
    total = None
    for sa, sb in zip(signals_a, signals_b):
        kind = sa.block.kind
        if kind == BlockKind.FLAT:
            k = torch.einsum("cbp,csp->bs", sa.grads, sb.grads)
        elif kind == BlockKind.OUTER:
            g = sa.inputs.shape[2]
            da, db = (s.grads.unflatten(-1, (g, -1)) for s in (sa, sb))  # [C, B, T, g, rows/g]
            same_inputs = torch.einsum("btgi,sugi->gbtsu", sa.inputs, sb.inputs)
            same_grads = torch.einsum("cbtgo,csugo->gbtsu", da, db)
            k = (same_inputs * same_grads).sum((0, 2, 4))
        else:  # embedding: a token's one-hot inputs match only the same token
            same_inputs = sa.inputs[:, :, None, None] == sb.inputs[None, None]
            same_grads = torch.einsum("cbtj,csuj->btsu", sa.grads, sb.grads)
            k = (same_grads * same_inputs).sum((1, 3))
        total = k if total is None else total + k
    return total
