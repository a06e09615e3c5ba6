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
from dataclasses import dataclass

import numpy as np
import torch

DENSE_KINDS = ("rademacher", "gaussian")
PROJECTOR_KINDS = DENSE_KINDS + ("sketch",)
BLOCK_ELEMENTS = 1 << 22  # float32 entries per generated block of R: part of R's definition for a seed
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes: the largest buffer a featurization step may allocate


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


def _fold(x: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum the ``k``-long chunks of the last dimension (bucket ``p mod k`` of coordinate ``p``), into
    ``out`` if given."""
    n = x.shape[-1]
    whole = n // k * k
    if out is None:
        out = x.new_empty(*x.shape[:-1], k)
    if whole:
        torch.sum(x[..., :whole].unflatten(-1, (-1, k)), -2, out=out)
        out[..., : n - whole] += x[..., whole:]
    else:
        out.zero_()[..., :n] = x
    return out


def _columns(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[..., index]``, gathered as a matrix (much faster than along the last of several dimensions)."""
    return x.reshape(-1, x.shape[-1]).index_select(1, index).view(*x.shape[:-1], len(index))


def _signed_columns(a: torch.Tensor, h: BlockHash) -> torch.Tensor:
    """``ã``: the inputs ``[B, T, groups, cols]`` with their columns permuted and signed, laid out
    columns-last; inputs laid out positions-last (convolutions' patches) are gathered in that layout."""
    positions_last = a.permute(0, 2, 3, 1)
    if not positions_last.is_contiguous():
        return _columns(a, h.col_index).mul_(h.col_sign)
    gathered = positions_last.index_select(2, h.col_index).permute(0, 3, 1, 2)
    return a.new_empty(a.shape).copy_(gathered).mul_(h.col_sign)


def _hash_row(g: torch.Tensor, h: BlockHash, k: int) -> torch.Tensor:
    """The count-sketch ``[..., K]`` of gradients with one row, ``[..., cols]``, formed as they are."""
    return torch.roll(_fold(_columns(g, h.col_index).mul_(h.col_sign * h.row_sign), k), h.offset, -1)


def hash_positions(blocks: list) -> list[int]:
    """The position in the layout whose hash each block uses: its own, or that of the first block holding
    the same parameters (the uses of a weight tied between modules), so that their sketches add up to
    the sketch of the weight's gradient."""
    first: dict[tuple, int] = {}
    return [first.setdefault(blk.params, position) for position, blk in enumerate(blocks)]


class SketchProjector:
    """A count-sketch ``R`` (``K × P``, one ``±1`` per column, no scaling: ``E[<Ru, Rv>] = <u, v>``)
    applied to per-layer signals without forming per-example gradients.

    Each layer's gradient matrix gets a tensor-sketch-shaped hash (see :class:`BlockHash`): bucket
    ``offset + o·cols + π(i)`` and sign ``s_r(o)·s_c(i)`` for entry ``(o, i)``. For a layer whose
    per-example gradient is ``Σ_t δ_t a_tᵀ`` this allows two exact ways to apply ``R``:

    - *fold*: sign and permute the inputs' columns, form ``Σ_t δ_t ãᵀ_t`` for every class and example
      with one batched matrix product, sign its rows and sum its ``K``-long chunks: ``T·rows·cols`` per
      example and class, cheap for convolutions;
    - *FFT*: the sketch of an outer product is the circular convolution of the two factors' own
      count-sketches, so ``Σ_t IFFT(FFT(CS(δ_t))·FFT(CS(ã_t)))`` costs ``T·K·log K`` and never forms
      the ``rows × cols`` matrix: cheap for large linear layers.

    Both give the same features: the choice per layer is a matter of speed only, by a flop count in
    which ``fft_weight`` prices one FFT flop and ``fold_weight`` one element of the formed matrix,
    each against one multiply-add of a matrix product (measured on a CPU). Embeddings are scattered
    directly; normalisation layers and the fallback gradients are small and hashed as they are. All
    blocks share the ``K`` buckets (random offsets keep them apart on average). The hash depends only
    on ``(seed, K, block position and shape)``, so the same seed gives the same features whatever the
    batch size or device.

    Every class is sketched at once, so that the number of operations does not grow with the number
    of classes; the formed matrices (and FFT buffers) are built for ``piece_bytes`` worth of examples
    at a time (default: 2 MiB, a CPU cache, on the CPU; 256 MiB on other devices, whose operations
    have a fixed cost per launch).
    """

    kind = "sketch"

    def __init__(
        self,
        projection_dim: int,
        seed: int = 0,
        fft_weight: float = 11.0,
        fold_weight: float = 16.0,
        piece_bytes: int | None = None,
    ):
        self.projection_dim = check_projection_dim(projection_dim)
        self.seed = int(seed)
        self.fft_weight = float(fft_weight)
        self.fold_weight = float(fold_weight)
        self.piece_bytes = piece_bytes
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

    def prefers_fft(self, block, positions: int) -> bool:
        """Whether the FFT route is cheaper than forming the gradient matrix for an ``outer`` block
        whose input has ``positions`` positions."""
        k = self.projection_dim
        fold = positions * block.rows * block.cols + self.fold_weight * block.rows * block.cols
        fft = self.fft_weight * positions * block.groups * k * math.log2(k)
        return fft < fold

    def _examples_per_piece(self, per_example: int, itemsize: int, device: torch.device) -> int:
        budget = self.piece_bytes if self.piece_bytes is not None else (1 << 21 if device.type == "cpu" else 1 << 28)
        return max(1, budget // (per_example * itemsize))

    def project(self, signals: list) -> torch.Tensor:
        """``[B, C, K]`` sketches of the per-example, per-class gradients described by ``signals``
        (one :class:`~lightning_ntk.layers.LayerSignals` per block, in layout order, all classes)."""
        positions = hash_positions([sig.block for sig in signals])
        return sum(self.sketch(position, sig.block, sig.inputs, sig.grads) for position, sig in zip(positions, signals)).transpose(0, 1)

    __call__ = project

    def prepare(self, position: int, block, inputs: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """What the sketch of a block needs from its input side, the same for every class: for ``outer``
        blocks the inputs with their columns signed and permuted, ``ã`` ``[B, T, groups, cols]`` (on the
        FFT route, the spectra of their count-sketches, ``[B, T, groups, K/2+1]``); other blocks' inputs
        as they are."""
        if inputs is None or block.kind != "outer":
            return inputs
        h = self.block_hash(position, block, inputs.device, dtype)
        a = _signed_columns(inputs.to(dtype), h)
        return torch.fft.rfft(_fold(a, self.projection_dim)) if self.prefers_fft(block, a.shape[1]) else a

    def sketch(self, position: int, block, inputs: torch.Tensor | None, grads: torch.Tensor, prepared: torch.Tensor | None = None) -> torch.Tensor:
        """``[C, B, K]``: the sketch of one block's gradients for every class, from its signals in the
        layout of :class:`~lightning_ntk.layers.LayerSignals` (``grads`` class-first); ``prepared`` is
        :meth:`prepare`'s result for these inputs, if already at hand."""
        dtype = torch.promote_types(grads.dtype, torch.float32)
        h = self.block_hash(position, block, grads.device, dtype)
        d = grads.to(dtype)
        if prepared is None:
            prepared = self.prepare(position, block, inputs, dtype)
        if block.kind == "flat":
            return _hash_row(d, h, self.projection_dim)
        if block.kind == "embedding":
            return self._embedding(block, h, prepared, d)
        if block.kind == "scale":
            x = prepared.to(dtype)
            parts = [torch.einsum("cbtd,btd->cbd", d, x) if p.endswith("weight") else d.sum(2) for p in block.params]
            return _hash_row(torch.cat(parts, dim=-1), h, self.projection_dim)
        if prepared.is_complex():  # spectra: prepared for the FFT route
            return self._outer_spectrum(block, h, prepared, d)
        return self._outer_fold(block, h, prepared, d)

    def _outer_fold(self, block, h: BlockHash, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``d`` ``[C, B, T, rows]``: form ``Σ_t d_t ãᵀ_t`` for all classes with its rows signed, fold it."""
        k, g, rows = self.projection_dim, block.groups, block.rows
        classes, n, t = d.shape[:3]
        step = self._examples_per_piece(classes * block.size, d.element_size(), d.device)
        sign_first = t < block.cols  # sign the rows of d (T·rows) rather than those of the matrix (rows·cols)
        folded = d.new_empty(n, classes, k)
        for s in range(0, n, step):
            ds, as_ = d[:, s : s + step], a[s : s + step]
            b = ds.shape[1]
            if g == 1:  # the classes stacked as rows of one matrix product per example
                lhs = ds.permute(1, 0, 3, 2)
                if sign_first:
                    lhs = torch.mul(lhs, h.row_sign[:, None], out=d.new_empty(lhs.shape))
                m = torch.bmm(lhs.reshape(b, classes * rows, t), as_[:, :, 0]).view(b, classes, rows, block.cols)
            else:
                ds = ds * h.row_sign if sign_first else ds
                m = torch.einsum("cbtgo,btgi->bcgoi", ds.unflatten(-1, (g, -1)), as_).reshape(b, classes, rows, block.cols)
            if not sign_first:
                m.mul_(h.row_sign[:, None])
            _fold(m.view(b, classes, rows * block.cols), k, folded[s : s + step])
        return torch.roll(folded, h.offset, -1).transpose(0, 1)

    def _outer_spectrum(self, block, h: BlockHash, a_hat: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``d`` ``[C, B, T, rows]``: ``IFFT(Σ_t FFT(CS(d_t))·FFT(CS(ã_t)))`` for all classes."""
        k, g = self.projection_dim, block.groups
        classes, n, t = d.shape[:3]
        per_group = block.rows // g
        buckets = ((h.offset + torch.arange(block.rows, device=d.device) * block.cols) % k).view(g, per_group)
        signed = (d * h.row_sign).unflatten(-1, (g, per_group))
        step = self._examples_per_piece(classes * t * g * (k + 2), d.element_size(), d.device)
        pieces = []
        for s in range(0, n, step):
            ds = signed[:, s : s + step]
            sketch = ds.new_zeros(*ds.shape[:-1], k).scatter_add_(-1, buckets.expand(*ds.shape[:-2], g, per_group), ds)
            pieces.append(torch.einsum("cbtgf,btgf->cbf", torch.fft.rfft(sketch), a_hat[s : s + step]))
        spectrum = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        return torch.fft.irfft(spectrum, n=k)

    def _embedding(self, block, h: BlockHash, tokens: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``d`` ``[C, B, T, cols]``: scatter each token's gradient row into its buckets."""
        k = self.projection_dim
        signed = _columns(d, h.col_index).mul_(h.col_sign).mul_(h.row_sign[tokens][..., None])
        buckets = (h.offset + tokens[..., None] * block.cols + torch.arange(block.cols, device=d.device)) % k
        out = d.new_zeros(*d.shape[:2], k)
        return out.scatter_add_(-1, buckets.flatten(1).expand(d.shape[0], -1, -1), signed.flatten(2))
