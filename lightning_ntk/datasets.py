"""Real data that needs no download: scikit-learn's bundled 8×8 handwritten digits.

The demo, the tests and the reproduction study all use it, so a user can run everything offline.
"""

from __future__ import annotations

import lightning as L
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
