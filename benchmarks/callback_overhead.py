"""What the callback with its defaults adds to a training run: fit time with and without it, side by side.

Two models a user might bring, neither shipped with the README's examples:

- ``cnn``: a small ResNet-style CNN (residual blocks with BatchNorm) on 5,000 synthetic 3×32×32 images of
  10 classes (class templates plus noise), 1,000 validation images, batches of 64;
- ``bert``: a 2-layer ``BertForSequenceClassification`` built from a config (hidden size 64) on 2,000
  synthetic token sequences of 4 classes (which of four marker tokens comes first), 500 validation ones.

Each trains for ``--epochs`` epochs, once without the callback and once with ``NTKAttributionCallback()``
at its defaults (the budget schedule, 1,000 reference and 500 query examples, K = 1,024), same seed,
same CSV logger, no progress bar, in one process and one after the other. The table gives both wall
times of ``trainer.fit``, their ratio (the target: at most 1.3), the checkpoints taken and the store's size.
On a shared machine the two runs may meet different loads, so the table also gives the ratio within the
run with the callback: its wall time against that time less the callback's own seconds (the pre-training
estimate and every checkpoint, as the callback counts them for its budget), both measured in the same run.

    python benchmarks/callback_overhead.py                 # both models, 10 epochs: ~12 minutes on 2 cores
    python benchmarks/callback_overhead.py --quick         # small sizes, to check that it runs
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ntk import NTKAttributionCallback
from lightning_ntk.demos import Classifier
from lightning_ntk.demos.text import TextClassifier, small_bert
from lightning_ntk.store import FeatureStore


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def resnet(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), Residual(16),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), Residual(32),
        nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(48), nn.ReLU(), Residual(48),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, classes),
    )


def images(count: int, seed: int, classes: int = 10) -> TensorDataset:
    """Class templates (fixed) plus per-image noise and a random brightness."""
    templates = torch.randn(classes, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (count,), generator=g)
    x = 0.5 * templates[labels] + torch.randn(count, 3, 32, 32, generator=g) * torch.rand(count, 1, 1, 1, generator=g) * 1.5
    return TensorDataset(x, labels)


MARKERS = (3, 4, 5, 6)  # token ids; the label is which of them comes first
VOCAB, LENGTH = 64, 24


def token_batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(MARKERS) + 3, VOCAB, (count, LENGTH), generator=g)
    labels = torch.randint(len(MARKERS), (count,), generator=g)
    for i in range(count):
        positions = torch.randperm(LENGTH - 1, generator=g)[: len(MARKERS)] + 1
        order = torch.randperm(len(MARKERS), generator=g)
        order = torch.cat([labels[i : i + 1], order[order != labels[i]]])
        ids[i, positions.sort().values] = torch.tensor(MARKERS)[order]
    ids[:, 0] = 2  # [CLS]
    return [{"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": labels[i]} for i in range(count)]


def setup(name: str, quick: bool) -> tuple[L.LightningModule, DataLoader, DataLoader]:
    scale = 10 if quick else 1
    if name == "cnn":
        model, train, val = Classifier(resnet(), lr=0.05), images(5000 // scale, 0), images(1000 // scale, 1)
        return model, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256)
    network = small_bert(VOCAB, num_labels=len(MARKERS), hidden_size=64, max_positions=LENGTH)
    train, val = token_batches(2000 // scale, 0), token_batches(500 // scale, 1)
    return TextClassifier(network, lr=3e-3), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256)


def fit_seconds(name: str, epochs: int, quick: bool, root: Path, with_callback: bool) -> tuple[float, NTKAttributionCallback | None]:
    L.seed_everything(0, verbose=False)
    model, train, val = setup(name, quick)
    callback = NTKAttributionCallback() if with_callback else None
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=CSVLogger(root), callbacks=[callback] if callback else [],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    started = time.perf_counter()
    trainer.fit(model, train, val)
    return time.perf_counter() - started, callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn", "bert"], choices=["cnn", "bert"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a tenth of the data and 3 epochs, to check that it runs")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 3
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as folder:
            without, _ = fit_seconds(name, args.epochs, args.quick, Path(folder) / "without", False)
            with_it, callback = fit_seconds(name, args.epochs, args.quick, Path(folder) / "with", True)
            store = FeatureStore(callback._store.root)
            parameters = sum(p.numel() for p in callback.pipeline.model.parameters())
            epochs = [row.epoch for row in callback.history]
            spent = callback._cost.spent
            rows.append(f"| {name} ({parameters:,} parameters) | {args.epochs} | {without:.1f} | {with_it:.1f} | {with_it / without:.2f} | "
                        f"{spent:.1f} | {with_it / (with_it - spent):.2f} | {len(epochs)} (epochs {', '.join(map(str, epochs))}) | "
                        f"{store.size_bytes() / 1e6:.0f} |")
    print(f"\n{args.threads} thread(s), {args.epochs} epochs\n")
    print("| model | epochs | fit without the callback (s) | with its defaults (s) | ratio | the callback's own seconds | "
          "ratio within the run | checkpoints | store (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
