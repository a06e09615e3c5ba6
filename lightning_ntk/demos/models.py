"""Networks for the demos, the examples and the paper study: a LightningModule that trains any
classifier network, and the networks of the paper's setups and their digits analogues."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from ..metrics import predictions


class Classifier(L.LightningModule):
    """A network trained with cross-entropy (or BCE for a single logit), by SGD with momentum or Adam."""

    def __init__(self, network: nn.Module, lr: float = 0.05, optimizer: str = "sgd"):
        super().__init__()
        self.network = network
        self.lr = lr
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
        return F.cross_entropy(logits, y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(self(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (predictions(self(batch[0])) == batch[1]).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def binary_mlp(in_features: int) -> nn.Module:
    """The paper's MNIST "0 vs 1" network: an MLP with two hidden layers of 100 and a single logit."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 1))


def binary_cnn(in_channels: int, image_size: int) -> nn.Module:
    """A single-logit CNN for the binary image setups: three conv/pool stages and two linear layers."""
    side = image_size // 8
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * side * side, 64), nn.ReLU(), nn.Linear(64, 1),
    )


def digits_cnn() -> nn.Module:
    """A small CNN for the 10-class 8×8 digits."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


class DigitsClassifier(Classifier):
    """An MLP on the 8×8 digits (64 pixels, 10 classes), trained with SGD (momentum 0.9) and cross-entropy."""

    def __init__(self, hidden: int = 64, lr: float = 0.05):
        super().__init__(nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)), lr)
