"""The DDP reduction of the fidelity metric's states gives the single-process value (2 gloo processes)."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_ntk.metrics import SurrogateFidelity


def data(classes):
    """101 examples drawn from 30 distinct ones: equal logits, whose scores must tie whatever the shard."""
    rng = np.random.default_rng(11)
    rows = torch.as_tensor(rng.integers(0, 30, 101))
    labels = torch.as_tensor(rng.integers(0, max(2, classes), 30))[rows]
    net = torch.as_tensor(rng.normal(size=(30, classes)), dtype=torch.float32)[rows]
    sur = net + torch.as_tensor(rng.normal(size=(30, classes)), dtype=torch.float32)[rows]
    return net, sur, labels


def worker(rank, world, port, classes, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net, sur, labels = data(classes)
    metric = SurrogateFidelity()
    metric.update(net[rank::world], sur[rank::world], labels[rank::world])  # unequal shard sizes: 51 and 50
    result = {k: float(v) for k, v in metric.compute().items()}
    if rank == 0:
        out.put(result)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("classes", [1, 3])
def test_two_process_reduction_equals_single_process(classes):
    net, sur, labels = data(classes)
    single = SurrogateFidelity()
    single.update(net, sur, labels)
    expected = {k: float(v) for k, v in single.compute().items()}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=worker, args=(r, 2, port + classes, classes, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = queue.get(timeout=120)
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    for key, value in expected.items():
        assert got[key] == value or (key != "kendall_tau" and abs(got[key] - value) < 1e-12), key
