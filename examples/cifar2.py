"""The paper's CIFAR-10 "airplane vs automobile" setup: a single-logit CNN, its NTK surrogate's
fidelity tracked by a preset. CIFAR-10 (170 MB) is downloaded once into ``--data.data_dir`` from
torchvision's URL, checksum verified, without torchvision itself:

    python examples/cifar2.py fit --config callbacks/trntk_fidelity.yaml --trainer.max_epochs 20
"""

from lightning.pytorch.cli import LightningCLI
from mnist2 import BinaryClassifier, TorchvisionPairDataModule


class Cifar2CLI(LightningCLI):
    """The MNIST 0-vs-1 script with CIFAR-10 classes 0 (airplane) and 1 (automobile) and a CNN."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "data.dataset": "CIFAR10", "data.classes": (0, 1),
            "model.network": "cnn", "model.in_channels": 3, "model.image_size": 32,
        })


if __name__ == "__main__":
    Cifar2CLI(BinaryClassifier, TorchvisionPairDataModule, seed_everything_default=0)
