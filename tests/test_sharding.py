"""The surrogate's fit, query logits and attribution with features sharded over 2 real gloo processes equal
those of one process holding every row."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_ntk.attribution import attribute
from lightning_ntk.sharding import Shard
from lightning_ntk.surrogate import fit_from_features

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

TOP_K = 4


def problem(dtype):
    """61 training examples (ranks of 31 and 30 interleaved rows), 3 classes, 2×8 features; 7 queries."""
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(61, 3, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (61,), generator=generator)
    labels[:3] = torch.arange(3)
    query = torch.randn(7, 3, 8, generator=generator, dtype=torch.float64)
    return features.to(dtype), labels, query.to(dtype)


def results(features, labels, query, shard=None):
    """What the tests compare: the fit, its logits on the queries, and both attribution methods (the eigenbasis
    itself is not unique where the kernel is degenerate: it is compared through the influence it gives)."""
    train = features if shard is None else features[shard.rows]
    surrogate = fit_from_features(train, labels, normalize=False, alpha=1e-3, tolerance=1e-10, device="cpu", shard=shard)
    out = {"weight": surrogate.weight.detach(), "bias": surrogate.bias.detach(), "record": surrogate.fit_record,
           "residuals": surrogate.curvature.residuals, "losses": surrogate.curvature.losses,
           "logits": surrogate.predict_from_features(query)}
    for method in ("influence", "representer"):
        found = attribute(surrogate, query_features=query, top_k=TOP_K, method=method, block_size=8, return_scores=True)
        out[method] = {kind: getattr(found, f"{kind}_{part}") for kind in ("proponent", "opponent", "similar") for part in ("indices", "scores")}
        out[method]["scores"] = found.scores
    return out


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    found = {}
    for dtype in (torch.float64, torch.float32):
        features, labels, query = problem(dtype)
        shard = Shard(torch.arange(rank, len(features), world), len(features))
        found[str(dtype)] = results(features, labels, query, shard)
        found[str(dtype)]["bytes_sent"] = shard.bytes_sent
    features, labels, _ = problem(torch.float64)
    try:  # all the rows given to rank 0, which holds half of them; rank 1 is right
        rows = torch.arange(rank, len(features), world)
        fit_from_features(features if rank == 0 else features[rows], labels, shard=Shard(rows, len(features)))
    except ValueError as err:
        found["all_rows"] = str(err)
    try:  # both ranks hold rows 0..2 of 5
        Shard(torch.arange(3), 5)
    except ValueError as err:
        found["overlap"] = str(err)
    torch.save(found, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.start_processes(worker, args=(2, 29700 + os.getpid() % 200, str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def close(sharded, single, rtol, atol, path=""):
    if isinstance(single, dict):
        for key in single:
            if key not in ("warning", "kernel_passes", "rank", "refined_at", "precision"):
                close(sharded[key], single[key], rtol, atol, f"{path}.{key}")
    elif isinstance(single, torch.Tensor):
        torch.testing.assert_close(sharded, single, rtol=rtol, atol=atol, msg=path)
    elif isinstance(single, float):
        assert sharded == pytest.approx(single, rel=rtol, abs=atol), path
    else:
        assert sharded == single, path


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_sharded_fit_logits_and_attribution_equal_one_process(ranks, dtype, tolerance):
    single = results(*problem(dtype))
    assert single["record"]["converged"]
    for rank in ranks:  # every rank holds the whole result, and the same one
        close(rank[str(dtype)], single, tolerance, tolerance)
    assert ranks[0][str(dtype)]["weight"].equal(ranks[1][str(dtype)]["weight"])


def test_ranks_whose_rows_overlap_are_refused(ranks):
    assert all("do not cover 0..4 once" in rank["overlap"] for rank in ranks)


def test_features_of_other_rows_than_the_shards_are_refused(ranks):
    """Every rank is told, the right one too: none waits in a collective for the other."""
    assert ranks[0]["all_rows"].startswith("1 rank(s) got other rows of features than their shard holds (this rank: 31 rows in its shard, 61 rows")
    assert ranks[1]["all_rows"].startswith("1 rank(s) got other rows of features than their shard holds (this rank: 30 rows in its shard, 30 rows")


def test_a_shard_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        Shard(torch.arange(3), 3)
