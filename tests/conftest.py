"""Fixtures and helpers shared by the tests: W&B offline in a temporary folder, one torch thread for
tiny models, and the digits classifier, callback and Trainer runs of the callback tests."""

import os
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
    """The callback on 120 reference and 60 query digits, with K = 32 and small attribution tables."""
    projection = {"dim": 32, **(projection or {})}
    subsets = {"max_train_examples": 120, "max_query_examples": 60, **(subsets or {})}
    return NTKAttributionCallback(projection=projection, subsets=subsets, **{"top_k": 3, "table_examples": 4, **options})


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
