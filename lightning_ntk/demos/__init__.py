"""Demo models and data for the examples, the tests and the paper study (like ``lightning.pytorch.demos``):
a classifier LightningModule, the paper's networks, and data that needs no download."""

from .data import DigitsDataModule, DownloadError, download_torchvision_files, load_digits_tensors, load_torchvision_pair
from .models import Classifier, DigitsClassifier, binary_cnn, binary_mlp, digits_cnn

__all__ = ["Classifier", "DigitsClassifier", "DigitsDataModule", "DownloadError", "binary_cnn", "binary_mlp", "digits_cnn", "download_torchvision_files", "load_digits_tensors", "load_torchvision_pair"]
