"""The paper's MNIST "0 vs 1" setup: a single-logit MLP, its NTK surrogate's fidelity tracked by a preset.

A LightningCLI script, so any preset of ``callbacks/`` attaches the callback. It needs torchvision and a
network connection to download MNIST (torchvision is imported only when the data are prepared):

    pip install torchvision
    python examples/mnist2.py fit --config callbacks/trntk_fidelity.yaml --trainer.max_epochs 10

``examples/cifar2.py`` reuses these classes for CIFAR-10 "airplane vs automobile" with a CNN.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def mlp(in_features: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 1))


def cnn(in_channels: int, image_size: int) -> nn.Module:
    side = image_size // 8
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * side * side, 64), nn.ReLU(), nn.Linear(64, 1),
    )


class BinaryClassifier(L.LightningModule):
    """A two-class network with a single logit (binary cross-entropy), as in the paper's binary setups."""

    def __init__(self, network: str = "mlp", in_channels: int = 1, image_size: int = 28, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(in_channels * image_size**2) if network == "mlp" else cnn(in_channels, image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.binary_cross_entropy_with_logits(self(batch[0])[:, 0], batch[1].float())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", ((self(batch[0])[:, 0] > 0).long() == batch[1]).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class TorchvisionPairDataModule(L.LightningDataModule):
    """Two classes of a torchvision data set (``MNIST``, ``FashionMNIST``, ``CIFAR10``), relabelled 0/1;
    the validation set is the official test split."""

    def __init__(self, dataset: str = "MNIST", classes: tuple[int, int] = (0, 1), data_dir: str = "data", batch_size: int = 64):
        super().__init__()
        self.save_hyperparameters()

    def _split(self, train: bool, download: bool = False) -> TensorDataset:
        import torchvision  # only here: the library and the tests never need it

        data = getattr(torchvision.datasets, self.hparams.dataset)(self.hparams.data_dir, train=train, download=download)
        images, targets = torch.as_tensor(data.data), torch.as_tensor(data.targets)
        keep = (targets == self.hparams.classes[0]) | (targets == self.hparams.classes[1])
        x = images[keep].float() / 255.0
        x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.unsqueeze(1)  # [N, C, H, W]
        return TensorDataset(x, (targets[keep] == self.hparams.classes[1]).long())

    def prepare_data(self) -> None:
        for train in (True, False):
            self._split(train, download=True)

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.val_set = self._split(True), self._split(False)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


if __name__ == "__main__":
    LightningCLI(BinaryClassifier, TorchvisionPairDataModule, seed_everything_default=0)
