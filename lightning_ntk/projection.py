"""Seeded random projections ``φ = R g`` with ``E[<Ru, Rv>] = <u, v>``.

``R`` (``K×P``) is never built whole unless it fits the memory budget: it is generated in column
blocks whose contents depend only on ``(seed, K, P, block index)``, so the same seed gives the same
features whatever the batch size, device or budget.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PROJECTOR_KINDS = ("rademacher", "gaussian")
BLOCK_ELEMENTS = 1 << 22  # 16 MiB of float32 per generated block of R
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of R kept in memory between batches


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
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"Unknown projector {kind!r}; choose one of {PROJECTOR_KINDS}.")
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
        state = np.random.SeedSequence([self.seed, self.projection_dim, self.num_parameters, block]).generate_state(2)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
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
