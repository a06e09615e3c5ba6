"""Fixtures and helpers shared by the tests: W&B offline in a temporary folder, one torch thread for
tiny models, and the digits classifier, callback and Trainer runs of the callback tests."""

import gzip
import os
import struct
import sys

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_ntk import NTKAttributionCallback
from lightning_ntk.demos import Classifier, DigitsDataModule

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """W&B offline, with every folder it writes to under the test's temporary folder."""
    import wandb

    folder = tmp_path / "wandb_home"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield folder
    wandb.finish()


class DigitsMLP(Classifier):
    """A small digits classifier holding every piece of state a checkpoint could disturb: BatchNorm
    statistics, Dropout randomness and a frozen parameter."""

    def __init__(self, hidden: int = 16, lr: float = 0.1):
        super().__init__(nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 10)), lr)
        self.scale = nn.Parameter(torch.ones(64), requires_grad=False)

    def forward(self, x):
        return self.network(x * self.scale)


def small_callback(projection=None, subsets=None, **options):
    """The callback on 120 reference and 60 query digits, with K = 32 and small attribution tables, at
    every epoch unless the options give another schedule (or ``budget=...`` and no schedule)."""
    projection = {"dim": 32, **(projection or {})}
    subsets = {"max_train_examples": 120, "max_query_examples": 60, **(subsets or {})}
    schedule = {} if {"every_n_epochs", "epochs", "budget"} & set(options) else {"every_n_epochs": 1}
    return NTKAttributionCallback(projection=projection, subsets=subsets, **{"top_k": 3, "table_examples": 4, **schedule, **options})


def fit(root, callbacks=(), max_epochs=3, model=None, seed=0, ckpt_path=None, **trainer_options):
    L.seed_everything(seed, verbose=False)
    model = model or DigitsMLP()
    options = dict(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5)
    trainer = L.Trainer(callbacks=list(callbacks), **{**options, **trainer_options})
    trainer.fit(model, datamodule=DigitsDataModule(), ckpt_path=ckpt_path)
    return trainer, model


@pytest.fixture
def one_thread():
    """These models are tiny: one thread beats two that contend for a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stored_checkpoint(root, epoch):
    [folder] = (root / "ntk_store").glob(f"epoch={epoch:04d}-*")
    return {path.stem: torch.as_tensor(np.load(path)) for path in folder.glob("*.npy")}


# -- brute-force references and fake data files shared by several test modules ----------------------------


def brute_force_gradients(model, inputs, params=None):
    """[N, C, P] per-example, per-class gradients, one autograd.grad call at a time."""
    model.eval()
    chosen = [p for n, p in model.named_parameters() if params is None or n in params]
    n = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
    rows = []
    for i in range(n):
        if isinstance(inputs, dict):
            out = model(**{k: v[i : i + 1] for k, v in inputs.items()})[0]
        else:
            out = model(inputs[i : i + 1])[0]
        rows.append(torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(out[c], chosen, retain_graph=True, allow_unused=True, materialize_grads=True)]) for c in range(out.shape[0])]))
    return torch.stack(rows)


def brute_force_kernel(ga, gb, kind):
    if kind == "entk":
        return torch.einsum("acp,bdp->abcd", ga, gb)
    if kind == "pntk":
        ga, gb = ga.sum(1, keepdim=True), gb.sum(1, keepdim=True)
    k = torch.einsum("acp,bcp->ab", ga, gb)
    if kind == "trntk0":
        return k
    na = torch.einsum("acp,acp->a", ga, ga).sqrt()
    nb = torch.einsum("acp,acp->a", gb, gb).sqrt()
    return k / na[:, None] / nb[None, :]


def explicit_sketch(signals, sketch, dtype=torch.float64):
    """Apply the count-sketch the slow way: form each block's per-example gradient matrix and send every
    coordinate to its bucket with its sign, as the hash documents it."""
    c, b = signals[0].grads.shape[:2]
    k = sketch.projection_dim
    out = torch.zeros(b, c, k, dtype=dtype)
    for position, sig in enumerate(signals):
        blk = sig.block
        h = sketch.block_hash(position, blk, torch.device("cpu"), dtype)
        g = sig.matrix().reshape(b, c, blk.rows, blk.cols)
        column_of = torch.argsort(h.col_index)  # where each gradient column sits after the permutation
        rows = torch.arange(blk.rows)[:, None]
        bucket = (h.offset + rows * blk.cols + column_of[None, :]) % k
        sign = h.row_sign[:, None] * h.col_sign[column_of][None, :]
        for i in range(b):
            for j in range(c):
                out[i, j].index_add_(0, bucket.flatten(), (sign * g[i, j]).flatten())
    return out


def write_idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_fake_mnist(root, num_train=300, num_test=100, seed=0):
    """Random 28×28 images with labels 0-9, as torchvision's MNIST download leaves them."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    splits = {}
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        images[labels == 1, :, 14:] = 255  # make "1" learnable
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, gz=prefix == "train")
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        splits[prefix] = images, labels
    return splits
