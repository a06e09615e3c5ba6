"""Seeded random projections ``φ = R g`` with ``E[<Ru, Rv>] = <u, v>``.

Two families. :class:`RandomProjector` is the dense ``K×P`` Gaussian/Rademacher matrix of the
paper's proj-trNTK, applied to materialised gradients: the reference for kernel quality. ``R`` is
never built whole unless it fits the memory budget: it is generated in column blocks whose contents
depend only on ``(seed, K, P, block index)``, so the same seed gives the same features whatever the
batch size, device or budget.

:class:`SketchProjector` is a count-sketch (one random bucket and sign per gradient coordinate)
whose hash follows the layers' structure, so that it applies to the per-layer signals of
:mod:`lightning_ntk.layers` without forming per-example gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np
import torch
from torch.nn import functional as F

DENSE_KINDS = ("rademacher", "gaussian")
PROJECTOR_KINDS = DENSE_KINDS + ("sketch",)
BLOCK_ELEMENTS = 1 << 22  # 16 MiB of float32 per generated block of R
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of R kept in memory between batches
# Relative costs for choosing between the fold and FFT routes (measured on CPU): one FFT flop, and one
# element of the formed gradient matrix (signed and folded), each against one multiply-add of a matrix product.
FFT_WEIGHT = 11.0
FOLD_WEIGHT = 16.0
CACHE_BYTES = 1 << 21  # formed gradient matrices are processed in pieces of about this size


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator whose stream depends only on ``key`` (hashed, so that nearby keys are unrelated)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def check_projection_dim(projection_dim: int) -> int:
    if not isinstance(projection_dim, (int, np.integer)) or isinstance(projection_dim, bool) or projection_dim <= 0:
        raise ValueError(
            f"projection_dim must be a positive integer (the K of the random projection), got {projection_dim!r}. "
            "Typical values are 512 to 10,240; larger K gives a more accurate kernel."
        )
    return int(projection_dim)


class RandomProjector:
    """A dense ``K×P`` random matrix with i.i.d. entries ``±1/√K`` (Rademacher) or ``N(0, 1/K)``
    (Gaussian), applied block by block.

    Memory: ``K·P·itemsize`` bytes when that fits ``memory_budget`` (then ``R`` is cached after the
    first batch), otherwise one ``K × (BLOCK_ELEMENTS/K)`` block at a time, regenerated per batch.
    """

    def __init__(
        self,
        num_parameters: int,
        projection_dim: int,
        kind: str = "rademacher",
        seed: int = 0,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        if kind not in DENSE_KINDS:
            raise ValueError(f"Unknown projector {kind!r}; choose one of {DENSE_KINDS} (or 'sketch' through Featurizer).")
        if num_parameters <= 0:
            raise ValueError("Cannot project gradients of zero parameters.")
        self.num_parameters = int(num_parameters)
        self.projection_dim = check_projection_dim(projection_dim)
        self.kind = kind
        self.seed = int(seed)
        self.memory_budget = int(memory_budget)
        self.block_columns = max(1, BLOCK_ELEMENTS // self.projection_dim)
        self._cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_parameters / self.block_columns)

    def _generate(self, block: int) -> torch.Tensor:
        """Block ``block`` of ``Rᵀ``: rows ``[block·cols, (block+1)·cols)`` of the ``P×K`` matrix."""
        rows = min(self.block_columns, self.num_parameters - block * self.block_columns)
        gen = seeded_generator(self.seed, self.projection_dim, self.num_parameters, block)
        scale = 1.0 / math.sqrt(self.projection_dim)
        if self.kind == "gaussian":
            return torch.randn(rows, self.projection_dim, generator=gen).mul_(scale)
        signs = torch.randint(0, 2, (rows, self.projection_dim), generator=gen, dtype=torch.int8)
        return signs.to(torch.float32).mul_(2 * scale).sub_(scale)

    def _block(self, block: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (block, device, dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        rt = self._generate(block).to(device=device, dtype=dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if self.num_parameters * self.projection_dim * itemsize <= self.memory_budget:
            self._cache[key] = rt
        return rt

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        """``[..., P] → [..., K]``, accumulated over column blocks of ``R``."""
        if gradients.shape[-1] != self.num_parameters:
            raise ValueError(
                f"Expected gradients with {self.num_parameters} parameters in the last dimension, got {gradients.shape[-1]}."
            )
        flat = gradients.reshape(-1, self.num_parameters)
        out = torch.zeros(flat.shape[0], self.projection_dim, device=flat.device, dtype=flat.dtype)
        for b in range(self.num_blocks):
            lo = b * self.block_columns
            out.addmm_(flat[:, lo : lo + self.block_columns], self._block(b, flat.device, flat.dtype))
        return out.reshape(*gradients.shape[:-1], self.projection_dim)

    __call__ = project


@dataclass(frozen=True)
class BlockHash:
    """The count-sketch hash of one block's gradient matrix ``G`` (``rows × cols``).

    Column ``i`` of the signed, column-permuted matrix holds gradient column ``col_index[i]``; entry
    ``(j, i)`` goes to bucket ``(offset + j·cols + i) mod K`` with sign ``row_sign[j]·col_sign[i]``.
    Distinct coordinates that share a bucket get independent signs, so ``E[<Ru, Rv>] = <u, v>``.
    """

    row_sign: torch.Tensor
    col_index: torch.Tensor
    col_sign: torch.Tensor
    offset: int

    def to(self, device: torch.device, dtype: torch.dtype) -> "BlockHash":
        return BlockHash(self.row_sign.to(device, dtype), self.col_index.to(device), self.col_sign.to(device, dtype), self.offset)


def _fold(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sum the ``k``-long chunks of the last dimension (bucket ``p mod k`` of coordinate ``p``)."""
    n = x.shape[-1]
    whole = n // k * k
    out = x[..., :whole].reshape(*x.shape[:-1], -1, k).sum(-2) if whole else x.new_zeros(*x.shape[:-1], k)
    if whole < n:
        out[..., : n - whole] += x[..., whole:]
    return out


def _add_rolled(acc: torch.Tensor, x: torch.Tensor, offset: int) -> None:
    """``acc += roll(x, offset)`` along the last dimension, without a copy of ``x``."""
    k = acc.shape[-1]
    acc[..., offset:] += x[..., : k - offset]
    if offset:
        acc[..., :offset] += x[..., k - offset :]


class SketchProjector:
    """A count-sketch ``R`` (``K × P``, one ``±1`` per column, no scaling: ``E[<Ru, Rv>] = <u, v>``)
    applied to per-layer signals without forming per-example gradients.

    Each layer's gradient matrix gets a tensor-sketch-shaped hash (see :class:`BlockHash`): bucket
    ``offset + o·cols + π(i)`` and sign ``s_r(o)·s_c(i)`` for entry ``(o, i)``. For a layer whose
    per-example gradient is ``Σ_t δ_t a_tᵀ`` this allows two exact ways to apply ``R``:

    - *fold*: sign and permute the inputs' columns, form ``Σ_t δ_t ãᵀ_t`` with batched matrix products
      (a few examples at a time, so that it stays in cache), sign its rows and sum its ``K``-long
      chunks: ``T·rows·cols`` per example and class, cheap for convolutions;
    - *FFT*: the sketch of an outer product is the circular convolution of the two factors' own
      count-sketches, so ``Σ_t IFFT(FFT(CS(δ_t))·FFT(CS(ã_t)))`` costs ``T·K·log K`` and never forms
      the ``rows × cols`` matrix: cheap for large linear layers.

    Both give the same features: the choice per layer is a matter of speed only. Embeddings are
    scattered directly; normalisation layers and the fallback gradients are small and hashed as they
    are. All blocks share the ``K`` buckets (random offsets keep them apart on average). The hash
    depends only on ``(seed, K, block position and shape)``, so the same seed gives the same
    features whatever the batch size or device.
    """

    kind = "sketch"

    def __init__(self, projection_dim: int, seed: int = 0):
        self.projection_dim = check_projection_dim(projection_dim)
        self.seed = int(seed)
        self._cache: dict[tuple, BlockHash] = {}

    def block_hash(self, position: int, block, device: torch.device, dtype: torch.dtype) -> BlockHash:
        """The hash of the block at ``position`` of the layout, on ``device``."""
        key = (position, block.kind, block.rows, block.cols, device, dtype)
        if key not in self._cache:
            k = self.projection_dim
            gen = seeded_generator(self.seed, k, position, block.rows, block.cols)
            signs = torch.randint(0, 2, (block.rows + block.cols,), generator=gen).mul_(2).sub_(1)
            col_index = torch.randperm(block.cols, generator=gen)
            offset = int(torch.randint(0, k, (1,), generator=gen))
            self._cache[key] = BlockHash(signs[: block.rows], col_index, signs[block.rows :], offset).to(device, dtype)
        return self._cache[key]

    def project(self, signals: list) -> torch.Tensor:
        """``[B, C, K]`` sketches of the per-example, per-class gradients described by ``signals``
        (one :class:`~lightning_ntk.layers.LayerSignals` per block, in layout order, all classes)."""
        classes = zip(*(sig.grads for sig in signals))
        return self.project_stream([replace(sig, grads=(g,)) for sig, g in zip(signals, grads)] for grads in classes)

    __call__ = project

    def project_stream(self, stream: Iterable[list]) -> torch.Tensor:
        """Like :meth:`project`, from the one-class signals that
        :meth:`~lightning_ntk.layers.LayerGradients.stream` yields class by class: ``[B, C, K]``."""
        prepared: dict[int, torch.Tensor] = {}  # the inputs' side of each block, the same for every class
        return torch.stack([self._project_class(signals, prepared) for signals in stream], dim=1)

    def _project_class(self, signals: list, prepared: dict[int, torch.Tensor]) -> torch.Tensor:
        first = signals[0].grads[0]
        dtype = torch.promote_types(first.dtype, torch.float32)
        k = self.projection_dim
        acc = torch.zeros(first.shape[0], k, device=first.device, dtype=dtype)
        spectrum = None
        for position, sig in enumerate(signals):
            h = self.block_hash(position, sig.block, first.device, dtype)
            d = sig.grads[0].to(dtype)
            if sig.block.kind == "outer":
                if position not in prepared:
                    prepared[position] = self._prepare(sig, h, dtype)
                if self.prefers_fft(sig):
                    term = self._outer_spectrum(sig, d, h, prepared[position])
                    spectrum = term if spectrum is None else spectrum.add_(term)
                else:
                    self._outer_fold(sig, d, h, prepared[position], acc)
            elif sig.block.kind == "embedding":
                self._embedding(sig, d, h, acc)
            else:  # one row: the formed gradient, hashed as it is
                g = sig.matrix().reshape(first.shape[0], -1).to(dtype)
                _add_rolled(acc, _fold(g.index_select(-1, h.col_index).mul_(h.col_sign * h.row_sign), k), h.offset)
        if spectrum is not None:
            acc += torch.fft.irfft(spectrum, n=k)
        return acc

    def prefers_fft(self, sig) -> bool:
        """Whether the FFT route is cheaper than forming the gradient matrix (a flop count with the
        FFT weighted for its lower arithmetic efficiency than a matrix product)."""
        blk, t = sig.block, sig.inputs.shape[1]
        k = self.projection_dim
        fold = t * blk.rows * blk.cols + FOLD_WEIGHT * blk.rows * blk.cols
        fft = FFT_WEIGHT * t * blk.groups * k * math.log2(k)
        return fft < fold

    def _prepare(self, sig, h: BlockHash, dtype: torch.dtype) -> torch.Tensor:
        """The inputs with their columns signed and permuted, ``ã`` ``[B, T, groups, cols]`` (the FFT
        route takes their count-sketches' spectra, ``[B, T, groups, K/2+1]``)."""
        a = sig.inputs.to(dtype).index_select(-1, h.col_index).mul_(h.col_sign)
        if not self.prefers_fft(sig):
            return a
        k = self.projection_dim
        return torch.fft.rfft(_fold(a, k) if a.shape[-1] > k else F.pad(a, (0, k - a.shape[-1])))

    def _outer_fold(self, sig, d: torch.Tensor, h: BlockHash, a: torch.Tensor, acc: torch.Tensor) -> None:
        """``d`` ``[B, T, rows]``: form ``Σ_t d_t ãᵀ_t`` a few examples at a time, sign its rows, fold it."""
        blk = sig.block
        step = max(1, CACHE_BYTES // (blk.size * acc.element_size()))
        for s in range(0, a.shape[0], step):
            ds, as_ = d[s : s + step], a[s : s + step]
            if blk.groups == 1:
                g = torch.bmm(ds.transpose(1, 2), as_[:, :, 0])
            else:
                g = torch.einsum("btgo,btgi->bgoi", ds.unflatten(2, (blk.groups, -1)), as_)
            g = g.reshape(ds.shape[0], blk.rows, blk.cols).mul_(h.row_sign[:, None])
            _add_rolled(acc[s : s + step], _fold(g.flatten(1), self.projection_dim), h.offset)

    def _outer_spectrum(self, sig, d: torch.Tensor, h: BlockHash, a_hat: torch.Tensor) -> torch.Tensor:
        """``d`` ``[B, T, rows]``: ``Σ_t FFT(CS(d_t))·FFT(CS(ã_t))``, ``[B, K/2+1]``."""
        blk, k = sig.block, self.projection_dim
        b, t = d.shape[:2]
        g, per_group = blk.groups, blk.rows // blk.groups
        buckets = (h.offset + torch.arange(blk.rows, device=d.device) * blk.cols) % k
        index = buckets.view(g, per_group).expand(b, t, g, per_group)
        sketch = d.new_zeros(b, t, g, k).scatter_add_(-1, index, (d * h.row_sign).view(b, t, g, per_group))
        return torch.einsum("btgf,btgf->bf", torch.fft.rfft(sketch), a_hat)

    def _embedding(self, sig, d: torch.Tensor, h: BlockHash, acc: torch.Tensor) -> None:
        """``d`` ``[B, T, cols]``: scatter each token's gradient row into its buckets."""
        blk, k = sig.block, self.projection_dim
        tokens = sig.inputs  # [B, T]
        d = d.index_select(-1, h.col_index).mul_(h.col_sign).mul_(h.row_sign[tokens][..., None])
        buckets = (h.offset + tokens[..., None] * blk.cols + torch.arange(blk.cols, device=d.device)) % k
        acc.scatter_add_(-1, buckets.flatten(1), d.flatten(1))
