"""Training rows sharded over the ranks of a ``torch.distributed`` process group.

Under DDP each rank featurizes some of the training examples; gathering all of them on one rank
makes that rank hold the whole ``[N, F]`` feature matrix. A :class:`Shard` says which rows this rank
holds, and gives the two collectives the sharded fit and attribution need: ``all_reduce`` of a small
sum (``Φ_rᵀ x_r``, ``[F, C]``) and ``gather`` of per-row vectors (``[N_r, C]`` pieces into the
replicated ``[N, C]``). Nothing of size ``N × F`` ever crosses ranks. It works under any process group
Lightning's ``ddp``/``ddp_spawn`` strategies set up (gloo on CPUs, NCCL on GPUs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class Shard:
    """This rank's ``rows`` (global positions, ``[N_r]``) of ``num_train`` training rows, the rows of all ranks
    together covering ``0 .. num_train − 1`` once. Constructing it is a collective: every rank of ``group``
    (default: the default group) must construct its own at the same time. ``bytes_sent`` counts what this
    rank contributed to collectives since."""

    def __init__(self, rows: Any, num_train: int, group: Any = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "A Shard needs an initialised torch.distributed process group (Lightning's ddp/ddp_spawn strategies set one up; "
                "elsewhere call torch.distributed.init_process_group). In one process, fit on all the rows without shard=."
            )
        self.rows = torch.as_tensor(rows, dtype=torch.long).flatten()
        self.num_train, self.group = int(num_train), group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self.bytes_sent = 0
        counts = self.all_gather(torch.tensor([len(self.rows)]))
        self.counts = [int(count) for count in counts]
        self.order = torch.cat([part[:count] for part, count in zip(self.all_gather(self._padded(self.rows)), self.counts)])
        if not torch.equal(torch.sort(self.order).values, torch.arange(self.num_train)):
            raise ValueError(
                f"The ranks' rows do not cover 0..{self.num_train - 1} once each (together they hold {len(self.order)} rows): "
                f"give each rank distinct positions, e.g. rows=torch.arange(rank, {self.num_train}, world)."
            )

    def _padded(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` padded with zero rows to the largest rank's row count, as ``all_gather`` needs equal shapes."""
        return torch.cat([local, local.new_zeros(max(self.counts) - len(local), *local.shape[1:])])

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (all of one shape), in rank order."""
        sent = tensor.to(self.device).contiguous()
        self.bytes_sent += sent.numel() * sent.element_size()
        parts = [torch.empty_like(sent) for _ in range(self.world)]
        dist.all_gather(parts, sent, group=self.group)
        return [part.to(tensor.device) for part in parts]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (a new tensor, on ``tensor``'s device)."""
        total = tensor.to(self.device, copy=True).contiguous()
        self.bytes_sent += total.numel() * total.element_size()
        dist.all_reduce(total, group=self.group)
        return total.to(tensor.device)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Per-row values of this rank's rows (``[N_r, ...]``, in the order of ``rows``) gathered into the
        replicated ``[num_train, ...]`` tensor of all rows, on every rank."""
        parts = self.all_gather(self._padded(local))
        full = local.new_empty(self.num_train, *local.shape[1:])
        full[self.order] = torch.cat([part[:count] for part, count in zip(parts, self.counts)])
        return full
