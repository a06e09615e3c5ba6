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

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .jacobian import DEFAULT_MEMORY_BUDGET
from .blocks import Block, BlockKind
from .layers import gather_columns, hash_positions

DENSE_KINDS = ("rademacher", "gaussian")
PROJECTOR_KINDS = DENSE_KINDS + ("sketch",)
PRODUCT_PRECISIONS = ("auto", "float32", "bfloat16")
BLOCK_ELEMENTS = 1 << 22  # float32 entries per generated block of R: part of R's definition for a seed


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

    @functools.cached_property
    def signs(self) -> torch.Tensor:
        """``[rows, cols]``: the sign of every entry of the column-permuted matrix (built when first used)."""
        return self.row_sign[:, None] * self.col_sign


def _fold_into(x: torch.Tensor, k: int, offset: int, out: torch.Tensor, chunked: bool = False, signs: torch.Tensor | None = None) -> None:
    """Add coordinate ``p`` of ``x``'s last dimension, times ``signs[p]`` if given, to bucket ``(offset + p) mod k``
    of ``out``; the whole ``k``-wide chunks one at a time if ``chunked`` and there are at most 16 (faster on a
    CPU, where they and ``out`` stay in cache, and the signs are applied as they are added), else summed in
    one operation (on accelerators, where each operation costs a launch, and for many chunks, where the
    operations would cost more than the memory)."""
    n = x.shape[-1]
    head = min(n, k - offset)
    whole = (n - head) // k * k
    chunked = chunked and whole <= 16 * k
    if signs is not None and not chunked:  # signed in place: the callers' x are their own buffers
        x, signs = x.mul_(signs), None

    def add(into: torch.Tensor, start: int, stop: int) -> None:
        if signs is None:
            into += x[..., start:stop]
        else:
            into.addcmul_(x[..., start:stop], signs[start:stop])

    add(out[..., offset : offset + head], 0, head)
    if chunked:
        for start in range(head, head + whole, k):
            add(out, start, start + k)
    elif whole:
        out += x[..., head : head + whole].unflatten(-1, (-1, k)).sum(-2)
    if n - head - whole:
        add(out[..., : n - head - whole], head + whole, n)


def _hash_row(g: torch.Tensor, h: BlockHash, k: int, out: torch.Tensor, chunked: bool) -> None:
    """Add the count-sketch of gradients with one row, ``[..., cols]`` formed as they are, to ``out``."""
    _fold_into(gather_columns(g, h.col_index).mul_(h.col_sign * h.row_sign), k, h.offset, out, chunked)


def _signs_inputs(block, positions: int) -> bool:
    """Whether the fold route signs the inputs' columns and the output gradients' rows (``positions·(cols +
    rows)`` per example) rather than the formed matrices (``rows·cols`` per example and class)."""
    return positions < block.cols


class SketchTotal:
    """The sum of blocks' sketches ``[C, B, K]`` as the blocks are sketched: blocks on the fold routes
    add into ``folded`` at their buckets; those on the FFT route add their spectra, which :meth:`result`
    transforms back once for all of them."""

    def __init__(self, folded: torch.Tensor):
        self.folded = folded
        self.spectrum: torch.Tensor | None = None

    def add_spectrum(self, spectrum: torch.Tensor, examples: slice) -> None:
        if self.spectrum is None:
            f = self.folded
            self.spectrum = f.new_zeros(*f.shape[:-1], f.shape[-1] // 2 + 1, dtype=torch.promote_types(f.dtype, torch.complex64))
        self.spectrum[:, examples] += spectrum

    def result(self) -> torch.Tensor:
        if self.spectrum is not None:
            self.folded += torch.fft.irfft(self.spectrum, n=self.folded.shape[-1])
            self.spectrum = None
        return self.folded


@functools.lru_cache(maxsize=1)
def has_bfloat16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX), where a batch of a
    convolution's per-example products runs 2.5–3.5× faster in bfloat16 than in float32 (measured)."""
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in info)
    except OSError:
        return False


def check_product_precision(precision: str) -> str:
    if precision not in PRODUCT_PRECISIONS:
        raise ValueError(f"Unknown product_precision {precision!r}; choose one of {PRODUCT_PRECISIONS}.")
    return precision


def bfloat16_products(precision: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether large float32 matrix products on ``device`` take their inputs in bfloat16, with float32
    sums, under ``precision`` (``"auto"``: where the CPU multiplies bfloat16 in hardware)."""
    if check_product_precision(precision) == "float32" or dtype != torch.float32:
        return False
    return precision == "bfloat16" or (device.type == "cpu" and has_bfloat16_matrix_units())


class SketchProjector:
    """A count-sketch ``R`` (``K × P``, one ``±1`` per column, no scaling: ``E[<Ru, Rv>] = <u, v>``)
    applied to per-layer signals without forming per-example gradients: a
    :class:`~lightning_ntk.layers.SignalProjector`.

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
    have a fixed cost per launch), and folded into the ``K`` buckets chunk by chunk if
    ``chunked_fold`` (default: on the CPU) or in one operation. Each block adds into one running sum
    per backward pass (:class:`SketchTotal`), so no ``K``-wide tensor per block outlives its sketch.

    ``product_precision``: the fold route's matrix products take float32 signals in bfloat16, with
    float32 sums, if ``"bfloat16"``; ``"auto"`` does so on CPUs with bfloat16 matrix units (AMX), for
    products whose three sides hold at least 32 (a convolution's; smaller ones gain nothing there).
    Rounding to 8 bits moves a feature by about 0.1% of its size and leaves the kernel's error (3% at
    K = 1,024, from the sketch itself) unchanged to three digits; ``"float32"`` keeps the signals' precision.
    """

    kind = "sketch"

    def __init__(
        self,
        projection_dim: int,
        seed: int = 0,
        fft_weight: float = 11.0,
        fold_weight: float = 16.0,
        piece_bytes: int | None = None,
        chunked_fold: bool | None = None,
        product_precision: str = "auto",
    ):
        self.projection_dim = check_projection_dim(projection_dim)
        self.seed = int(seed)
        self.fft_weight = float(fft_weight)
        self.fold_weight = float(fold_weight)
        self.piece_bytes = piece_bytes
        self.chunked_fold = chunked_fold
        self.product_precision = check_product_precision(product_precision)
        self._cache: dict[tuple, BlockHash] = {}
        self._buffers: dict[tuple, torch.Tensor] = {}

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

    def _scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` in a buffer kept between calls on the CPU, where fresh
        memory of this size costs page faults at every use; elsewhere a new tensor (caching allocators)."""
        if like.device.type != "cpu":
            return like.new_empty(shape)
        numel = math.prod(shape)
        key = (name, like.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = like.new_empty(numel)
        return buffer[:numel].view(shape)

    def product_dtype(self, block, positions: int, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The precision of a fold-route block's matrix products, for signals of ``dtype``."""
        if not bfloat16_products(self.product_precision, dtype, device):
            return dtype
        large = min(block.rows // block.groups, block.cols, positions) >= 32
        return torch.bfloat16 if large or self.product_precision == "bfloat16" else dtype

    def _chunked(self, device: torch.device) -> bool:
        return self.chunked_fold if self.chunked_fold is not None else device.type == "cpu"

    def _examples_per_piece(self, per_example: int, itemsize: int, device: torch.device) -> int:
        budget = self.piece_bytes if self.piece_bytes is not None else (1 << 21 if device.type == "cpu" else 1 << 28)
        return max(1, budget // (per_example * itemsize))

    def project(self, signals: list) -> torch.Tensor:
        """``[B, C, K]`` sketches of the per-example, per-class gradients described by ``signals``
        (one :class:`~lightning_ntk.layers.LayerSignals` per block, in layout order, all classes)."""
        total = None
        for position, sig in zip(hash_positions([sig.block for sig in signals]), signals):
            total = self.sketch(position, sig.block, sig.inputs, sig.grads, into=total)
        return total.result().transpose(0, 1)

    __call__ = project

    def running_sum(self, out: torch.Tensor) -> SketchTotal:
        return SketchTotal(out)

    def column_order(self, position: int, block, device: torch.device) -> torch.Tensor:
        """The order in which :meth:`prepare` wants an ``outer`` block's input columns (``ordered=True``),
        so that they can be gathered in it at once."""
        return self.block_hash(position, block, device, torch.float32).col_index

    def prepare(self, position: int, block, inputs: torch.Tensor | None, dtype: torch.dtype, ordered: bool = False) -> torch.Tensor | None:
        """What the sketch of a block needs from its input side, the same for every class: for ``outer``
        blocks the inputs with their columns permuted (and signed where the route signs inputs), ``ã``
        ``[B, T, groups, cols]`` (on the FFT route, the spectra of their count-sketches, ``[B, T, groups,
        K/2+1]``); other blocks' inputs as they are. ``ordered``: the columns are already in
        :meth:`column_order`."""
        if inputs is None or block.kind != BlockKind.OUTER:
            return inputs
        h = self.block_hash(position, block, inputs.device, dtype)
        a = inputs.to(dtype) if ordered else gather_columns(inputs.to(dtype), h.col_index)
        fft = self.prefers_fft(block, a.shape[1])
        if fft or _signs_inputs(block, a.shape[1]):
            a = a * h.col_sign if a is inputs else a.mul_(h.col_sign)
        if not fft:
            return a.to(self.product_dtype(block, a.shape[1], dtype, a.device))
        sketches = a.new_zeros(*a.shape[:-1], self.projection_dim)
        _fold_into(a, self.projection_dim, 0, sketches, self._chunked(a.device))
        return torch.fft.rfft(sketches)

    def sketch(self, position: int, block, inputs: torch.Tensor | None, grads: torch.Tensor, prepared: torch.Tensor | None = None,
               into: SketchTotal | None = None) -> SketchTotal:
        """Add the sketch of one block's gradients for every class, ``[C, B, K]``, to ``into`` (a new
        :class:`SketchTotal` if None) and return it; the signals are laid out as
        :class:`~lightning_ntk.layers.LayerSignals` lays them out (``grads`` class-first), and
        ``prepared`` is :meth:`prepare`'s result for these inputs, if already at hand."""
        dtype = torch.promote_types(grads.dtype, torch.float32)
        h = self.block_hash(position, block, grads.device, dtype)
        d = grads.to(dtype)
        if into is None:
            into = self.running_sum(d.new_zeros(*d.shape[:2], self.projection_dim))
        if prepared is None:
            prepared = self.prepare(position, block, inputs, dtype)
        k, out, chunked = self.projection_dim, into.folded, self._chunked(d.device)
        if block.kind == BlockKind.FLAT:
            _hash_row(d, h, k, out, chunked)
        elif block.kind == BlockKind.EMBEDDING:
            self._embedding(block, h, prepared, d, out)
        elif block.kind == BlockKind.SCALE:
            x = prepared.to(dtype)
            parts = [(d * x).sum(2) if p.endswith("weight") else d.sum(2) for p in block.params]
            _hash_row(torch.cat(parts, dim=-1), h, k, out, chunked)
        elif prepared.is_complex():  # spectra: prepared for the FFT route
            self._outer_spectrum(block, h, prepared, d, into)
        else:
            self._outer_fold(block, h, prepared, d, out, chunked)
        return into

    def _outer_fold(self, block, h: BlockHash, a: torch.Tensor, d: torch.Tensor, out: torch.Tensor, chunked: bool) -> None:
        """``d`` ``[C, B, T, rows]``: form ``Σ_t d_t ãᵀ_t`` for all classes, sign it, fold it into ``out``."""
        k, g, rows = self.projection_dim, a.shape[2], block.rows
        classes, n, t = d.shape[:3]
        step = self._examples_per_piece(classes * block.size, d.element_size(), d.device)
        signed_inputs = _signs_inputs(block, t)  # then sign the rows of d; else sign the formed matrices
        for s in range(0, n, step):
            ds, as_ = d[:, s : s + step], a[s : s + step]
            b = ds.shape[1]
            if g == 1:  # the classes stacked as rows of one matrix product per example
                lhs = ds.permute(1, 0, 3, 2)
                if signed_inputs:  # signed, in the products' precision
                    lhs = torch.mul(lhs, h.row_sign[:, None], out=self._scratch("lhs", lhs.shape, as_))
                elif lhs.dtype != as_.dtype:
                    lhs = self._scratch("lhs", lhs.shape, as_).copy_(lhs)
                m = torch.bmm(lhs.reshape(b, classes * rows, t), as_[:, :, 0], out=self._scratch("formed", (b, classes * rows, block.cols), as_))
                m = m.view(b, classes, rows, block.cols)
            else:
                ds = ds * h.row_sign if signed_inputs else ds
                m = torch.einsum("cbtgo,btgi->bcgoi", ds.unflatten(-1, (g, -1)).to(as_.dtype), as_).reshape(b, classes, rows, block.cols)
            if m.dtype != d.dtype:  # bfloat16 products: summed in the signals' precision
                m = self._scratch("formed sums", m.shape, d).copy_(m)
            signs = None if signed_inputs else h.signs.view(-1)
            _fold_into(m.view(b, classes, rows * block.cols), k, h.offset, out[:, s : s + b].transpose(0, 1), chunked, signs)

    def _outer_spectrum(self, block, h: BlockHash, a_hat: torch.Tensor, d: torch.Tensor, into: SketchTotal) -> None:
        """``d`` ``[C, B, T, rows]``: add ``Σ_t FFT(CS(d_t))·FFT(CS(ã_t))`` for all classes to ``into``'s spectrum."""
        k, g = self.projection_dim, a_hat.shape[2]
        classes, n, t = d.shape[:3]
        per_group = block.rows // g
        buckets = ((h.offset + torch.arange(block.rows, device=d.device) * block.cols) % k).view(g, per_group)
        signed = (d * h.row_sign).unflatten(-1, (g, per_group))
        step = self._examples_per_piece(classes * t * g * (k + 2), d.element_size(), d.device)
        for s in range(0, n, step):
            ds = signed[:, s : s + step]
            sketch = ds.new_zeros(*ds.shape[:-1], k).scatter_add_(-1, buckets.expand(*ds.shape[:-2], g, per_group), ds)
            into.add_spectrum(torch.einsum("cbtgf,btgf->cbf", torch.fft.rfft(sketch), a_hat[s : s + step]), slice(s, s + ds.shape[1]))

    def _embedding(self, block, h: BlockHash, tokens: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> None:
        """``d`` ``[C, B, T, cols]``: scatter each token's gradient row into its buckets of ``out``."""
        k = self.projection_dim
        signed = gather_columns(d, h.col_index).mul_(h.col_sign).mul_(h.row_sign[tokens][..., None])
        buckets = (h.offset + tokens[..., None] * block.cols + torch.arange(block.cols, device=d.device)) % k
        out.scatter_add_(-1, buckets.flatten(1).expand(d.shape[0], -1, -1), signed.flatten(2))
