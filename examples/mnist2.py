"""The paper's MNIST "0 vs 1" setup: a single-logit MLP, its NTK surrogate's fidelity tracked by a preset.

A LightningCLI script, so any preset of ``callbacks/`` attaches the callback. The data are read from
torchvision's file layout under ``--data.data_dir`` (default ``data``); when they are missing, they are
downloaded once from torchvision's URLs (``--data.mirror`` replaces them), checksums verified, without
torchvision itself:

    python examples/mnist2.py fit --config callbacks/trntk_fidelity.yaml --trainer.max_epochs 10

``examples/cifar2.py`` reuses these classes for CIFAR-10 "airplane vs automobile" with a CNN.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

from lightning_ntk.demos import Classifier, binary_cnn, binary_mlp, download_torchvision_files, load_torchvision_pair


class BinaryClassifier(Classifier):
    """A two-class network with a single logit (binary cross-entropy, SGD with momentum), as in the
    paper's binary setups."""

    def __init__(self, network: str = "mlp", in_channels: int = 1, image_size: int = 28, lr: float = 0.01):
        net = binary_mlp(in_channels * image_size**2) if network == "mlp" else binary_cnn(in_channels, image_size)
        super().__init__(net, lr)
        self.save_hyperparameters()


class TorchvisionPairDataModule(L.LightningDataModule):
    """Two classes of a torchvision data set (``MNIST``, ``FashionMNIST``, ``CIFAR10``), relabelled 0/1;
    the validation set is the official test split. ``mirror``: a base URL to download from instead of
    torchvision's (None: torchvision's)."""

    def __init__(self, dataset: str = "MNIST", classes: tuple[int, int] = (0, 1), data_dir: str = "data", batch_size: int = 64,
                 mirror: str | None = None):
        super().__init__()
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        try:
            self._load()
        except FileNotFoundError:
            download_torchvision_files(self.hparams.dataset, self.hparams.data_dir, base_url=self.hparams.mirror)

    def _load(self):
        return load_torchvision_pair(self.hparams.dataset, self.hparams.data_dir, tuple(self.hparams.classes))

    def setup(self, stage: str | None = None) -> None:
        x_train, y_train, x_test, y_test = self._load()
        self.train_set, self.val_set = TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


if __name__ == "__main__":
    LightningCLI(BinaryClassifier, TorchvisionPairDataModule, seed_everything_default=0)
