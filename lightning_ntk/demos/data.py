"""Real data that needs no download: scikit-learn's bundled 8×8 handwritten digits.

The demo, the tests and the reproduction study all use it, so a user can run everything offline.
Users who have downloaded MNIST, FashionMNIST or CIFAR-10 with torchvision can read two-class subsets
of them with :func:`load_torchvision_pair`.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def load_digits_tensors(
    classes: tuple[int, ...] | None = None,
    test_fraction: float = 0.2765,
    seed: int = 0,
    image_shape: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` from ``sklearn.datasets.load_digits``, pixels scaled to
    [0, 1], split with a seeded stratified shuffle (the default gives 1,300 train / 497 test).

    ``classes`` keeps only those digits and relabels them ``0..len(classes)-1`` (``(0, 1)`` is the
    binary "0 vs 1" task); ``image_shape`` returns ``[N, 1, 8, 8]`` images instead of 64-vectors.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("The digits data set ships with scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    x = torch.as_tensor(digits.data / 16.0, dtype=dtype)
    y = torch.as_tensor(digits.target, dtype=torch.long)
    if classes is not None:
        keep = torch.isin(y, torch.tensor(classes))
        x, y = x[keep], y[keep]
        y = torch.tensor([classes.index(int(v)) for v in y], dtype=torch.long)
    if image_shape:
        x = x.reshape(-1, 1, 8, 8)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed, stratify=y.numpy()
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


class DigitsDataModule(L.LightningDataModule):
    """The digits as ``(x, y)`` batches: the validation set is the held-out test split."""

    def __init__(
        self,
        batch_size: int = 64,
        classes: tuple[int, ...] | None = None,
        image_shape: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.classes = tuple(classes) if classes is not None else None
        self.image_shape = image_shape
        self.seed = seed

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else 10

    def setup(self, stage: str | None = None) -> None:
        x_train, y_train, x_test, y_test = load_digits_tensors(self.classes, seed=self.seed, image_shape=self.image_shape)
        self.train_set = TensorDataset(x_train, y_train)
        self.val_set = TensorDataset(x_test, y_test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


TORCHVISION_LAYOUTS = {
    # name: (folder under the root, training files, test files)
    "MNIST": ("MNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    "FashionMNIST": ("FashionMNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    "CIFAR10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",)),
}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian dimensions after a magic number), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _existing(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(folder / name)


def _read_split(dataset: str, folder: Path, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, C, H, W]`` (uint8) and labels of one split in torchvision's on-disk layout."""
    if dataset == "CIFAR10":
        batches = []
        for name in files:
            with open(_existing(folder, name), "rb") as f:
                batches.append(pickle.load(f, encoding="bytes"))
        images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        return images, np.concatenate([np.asarray(b[b"labels"]) for b in batches])
    images, labels = (_read_idx(_existing(folder, name)) for name in files)
    return images[:, None], labels


def load_torchvision_pair(
    dataset: str,
    root: str | Path,
    classes: tuple[int, int],
    max_train: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` for two classes of MNIST, FashionMNIST or CIFAR-10, read
    from the files torchvision downloads into ``root`` (torchvision itself is not imported). Images are
    ``[N, C, H, W]`` in [0, 1]; ``classes[1]`` is label 1. ``max_train`` keeps a seeded random subset of
    the training split; the test split is the official one.

    Raises ``FileNotFoundError`` naming the missing file and how to download the data set.
    """
    if dataset not in TORCHVISION_LAYOUTS:
        raise ValueError(f"Unknown data set {dataset!r}; choose one of {sorted(TORCHVISION_LAYOUTS)}.")
    folder, train_files, test_files = TORCHVISION_LAYOUTS[dataset]
    folder = Path(root) / folder
    try:
        splits = [_read_split(dataset, folder, files) for files in (train_files, test_files)]
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{dataset} is not under {Path(root).resolve()} ({err.args[0] if err.args else err} is missing). Download it once "
            f"with torchvision: python -c \"import torchvision; torchvision.datasets.{dataset}('{root}', download=True)\""
        ) from None
    tensors = []
    for split, (images, labels) in enumerate(splits):
        keep = np.flatnonzero(np.isin(labels, classes))
        if split == 0 and max_train is not None and len(keep) > max_train:
            keep = np.sort(np.random.default_rng(seed).choice(keep, max_train, replace=False))
        tensors += [torch.as_tensor(images[keep], dtype=dtype) / 255.0, torch.as_tensor(labels[keep] == classes[1], dtype=torch.long)]
    return tuple(tensors)
