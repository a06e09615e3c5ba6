"""The surrogate's fit and attribution with the reference features sharded over gloo ranks, against one
process holding them all: seconds, peak memory per rank and bytes each rank sends.

Features are synthetic (``[N, C, K]``, each a class mean plus noise), made block by block so that a rank
only ever holds its own rows. ``python benchmarks/sharded_fit.py --sizes 5000 10000 --ranks 2``.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_ntk.attribution import attribute
from lightning_ntk.sharding import Shard
from lightning_ntk.surrogate import fit_from_features

BLOCK = 1024


def labels_of(size: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (size,), generator=torch.Generator().manual_seed(1))


def features_of(rows: torch.Tensor, size: int, classes: int, dim: int) -> torch.Tensor:
    """The features of ``rows``, made in seeded blocks of the whole set: the same values whoever makes them."""
    means = torch.randn(classes, classes, dim, generator=torch.Generator().manual_seed(2))
    labels, parts = labels_of(size, classes), []
    for start in range(0, size, BLOCK):
        noise = 3 * torch.randn(min(BLOCK, size - start), classes, dim, generator=torch.Generator().manual_seed(100 + start))
        mine = rows[(rows >= start) & (rows < start + BLOCK)]
        parts.append(means[labels[mine]] + noise[mine - start])
    return torch.cat(parts)


def run(rank: int, world: int, port: int, size: int, classes: int, dim: int, queries: int, out: str) -> None:
    torch.set_num_threads(1)
    shard = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        shard = Shard(torch.arange(rank, size, world), size)
    rows = torch.arange(size) if shard is None else shard.rows
    features = features_of(rows, size, classes, dim)
    query = features_of(torch.arange(queries), size, classes, dim) + 0.5
    started = time.perf_counter()
    surrogate = fit_from_features(features, labels_of(size, classes), device="cpu", shard=shard)
    fitted = time.perf_counter()
    fit_bytes = 0 if shard is None else shard.bytes_sent
    attribute(surrogate, query_features=query, top_k=10)
    done = time.perf_counter()
    result = {"fit_s": fitted - started, "attribute_s": done - fitted, "passes": surrogate.fit_record["kernel_passes"],
              "iterations": surrogate.fit_record["iterations"], "converged": surrogate.fit_record["converged"],
              "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "features_gb": features.numel() * 4 / 2**30,
              "fit_bytes": fit_bytes, "attribute_bytes": 0 if shard is None else shard.bytes_sent - fit_bytes}
    torch.save(result, f"{out}/rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def measure(size: int, world: int, classes: int, dim: int, queries: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(run, args=(world, 29400 + os.getpid() % 300, size, classes, dim, queries, out), nprocs=world, start_method="spawn")
        return [torch.load(f"{out}/rank{rank}.pt") for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dim", type=int, default=256, help="K, the projection's dimension (features C·K wide)")
    parser.add_argument("--queries", type=int, default=500)
    args = parser.parse_args()
    print(f"C = {args.classes}, K = {args.dim}, {args.queries} queries, float32 features, 1 thread per process\n")
    print("| N | ranks | features per rank (GB) | fit s | passes | attribute s | peak RSS per rank (GB) | sent per rank: fit (MB) | per pass (MB) | attribute (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for world in (1, args.ranks):
            ranks = measure(size, world, args.classes, args.dim, args.queries)
            first, peaks = ranks[0], " / ".join(f"{r['peak_gb']:.2f}" for r in ranks)
            assert all(r["converged"] for r in ranks), "a fit did not converge"
            print(f"| {size} | {world} | {first['features_gb']:.3f} | {first['fit_s']:.1f} | {first['passes']} | {first['attribute_s']:.1f} | "
                  f"{peaks} | {first['fit_bytes'] / 1e6:.1f} | "
                  f"{first['fit_bytes'] / 1e6 / first['passes']:.2f} | {first['attribute_bytes'] / 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
