"""Real data that needs no download: scikit-learn's bundled 8×8 handwritten digits.

The demo, the tests and the reproduction study all use it, so a user can run everything offline.
MNIST, FashionMNIST and CIFAR-10 are read from torchvision's on-disk layout by
:func:`load_torchvision_pair` and downloaded into it by :func:`download_torchvision_files`, neither of
which imports torchvision: PyPI's torchvision does not import beside the CPU build of torch, and
installing it may replace that build with a CUDA one.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

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
    """The digits as ``(x, y)`` batches: the validation set is the held-out test split. ``as_images``:
    inputs ``[1, 8, 8]`` instead of 64 flat values. ``image_shape`` tells the callback's W&B tables how to
    show an input as an image."""

    def __init__(
        self,
        batch_size: int = 64,
        classes: tuple[int, ...] | None = None,
        as_images: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.classes = tuple(classes) if classes is not None else None
        self.as_images = as_images
        self.seed = seed

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else 10

    @property
    def image_shape(self) -> list[int]:
        return [1, 8, 8] if self.as_images else [8, 8]

    def setup(self, stage: str | None = None) -> None:
        x_train, y_train, x_test, y_test = load_digits_tensors(self.classes, seed=self.seed, image_shape=self.as_images)
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


@dataclass(frozen=True)
class TorchvisionSource:
    """Where torchvision downloads a data set from: base URLs tried in order, the folder under the root
    the files go to, each file's name and MD5, and whether they are ``.tar.gz`` archives to unpack
    into the root."""

    mirrors: tuple[str, ...]
    folder: str
    files: tuple[tuple[str, str], ...]
    archive: bool = False


_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
TORCHVISION_SOURCES = {  # the URLs and checksums of torchvision.datasets.MNIST, FashionMNIST and CIFAR10
    "MNIST": TorchvisionSource(
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"), "MNIST/raw",
        tuple(zip(_MNIST_FILES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                 "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))),
    ),
    "FashionMNIST": TorchvisionSource(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",), "FashionMNIST/raw",
        tuple(zip(_MNIST_FILES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                 "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))),
    ),
    "CIFAR10": TorchvisionSource(
        ("https://www.cs.toronto.edu/~kriz/",), ".", (("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),), archive=True,
    ),
}


class DownloadError(RuntimeError):
    """A data set file could not be downloaded, or what came was not the file expected."""


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(destination: Path, chunks: Iterable[bytes], md5: str | None = None) -> None:
    """Write ``chunks`` to a temporary file beside ``destination`` and move it there with one
    ``os.replace``: an interrupted write, or one whose MD5 is not ``md5``, leaves nothing behind."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise DownloadError(f"its MD5 is {digest.hexdigest()}, not the expected {md5} (a corrupted or changed file; nothing was kept)")
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _fetch(url: str, timeout: float) -> Iterator[bytes]:
    """The bytes at ``url`` in chunks; a network failure raises :class:`DownloadError` saying why."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                yield chunk
    except (OSError, http.client.HTTPException) as err:  # URLError, HTTPError and timeouts are OSErrors
        raise DownloadError(f"no answer ({getattr(err, 'reason', None) or err})") from err


def download_file(url: str, destination: str | Path, md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` if its MD5 checksum is ``md5``; otherwise raise
    :class:`DownloadError` and leave nothing there (the file is written beside it and moved in place)."""
    destination = Path(destination)
    try:
        _write_atomically(destination, _fetch(url, timeout), md5)
    except DownloadError as err:
        raise DownloadError(f"Could not download {url}: {err}.") from err
    return destination


def _unpack(archive: Path, root: Path) -> None:
    """Unpack a ``.tar.gz`` into ``root``, each file written atomically; members that would land
    outside ``root`` are refused."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            if path.is_absolute() or ".." in path.parts:
                raise DownloadError(f"{archive} holds {member.name!r}, a path outside its folder: delete the archive and download it again.")
            if member.isfile():
                source = tar.extractfile(member)
                _write_atomically(root.joinpath(*path.parts), iter(lambda: source.read(1 << 20), b""))


def download_torchvision_files(dataset: str, root: str | Path, base_url: str | None = None, timeout: float = 60.0) -> Path:
    """Download MNIST, FashionMNIST or CIFAR-10 into torchvision's layout under ``root``, from the
    URLs torchvision uses (``base_url`` replaces them, e.g. a local mirror), without torchvision.

    Files already there with the right MD5 are kept; every download is checked against its MD5 and
    moved into place only once complete. CIFAR-10's archive is unpacked into ``root``. Returns the
    folder :func:`load_torchvision_pair` reads. Without a network, raises :class:`DownloadError`
    naming each URL tried and where to copy the file by hand.
    """
    if dataset not in TORCHVISION_SOURCES:
        raise ValueError(f"Unknown data set {dataset!r}; choose one of {sorted(TORCHVISION_SOURCES)}.")
    source = TORCHVISION_SOURCES[dataset]
    mirrors = source.mirrors if base_url is None else (base_url,)
    folder = Path(root) / source.folder
    for name, md5 in source.files:
        destination = folder / name
        fresh = not (destination.exists() and _md5(destination) == md5)
        if fresh:
            failures = []
            for mirror in mirrors:
                try:
                    download_file(f"{mirror.rstrip('/')}/{name}", destination, md5, timeout)
                    break
                except DownloadError as err:
                    failures.append(str(err))
            else:
                raise DownloadError(
                    f"{dataset} could not be downloaded. {' '.join(failures)} Without network access here, download "
                    f"{name} from {mirrors[0].rstrip('/')}/{name} on a machine that has it, copy it to {destination.resolve()} "
                    f"(MD5 {md5}) and run again."
                )
        if source.archive and (fresh or _missing(dataset, Path(root))):
            _unpack(destination, Path(root))
    return Path(root) / TORCHVISION_LAYOUTS[dataset][0]


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


def _missing(dataset: str, root: Path) -> list[str]:
    """The files :func:`load_torchvision_pair` reads for ``dataset`` that are not under ``root``."""
    folder, train_files, test_files = TORCHVISION_LAYOUTS[dataset]
    missing = []
    for name in train_files + test_files:
        try:
            _existing(root / folder, name)
        except FileNotFoundError:
            missing.append(name)
    return missing


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

    Raises ``FileNotFoundError`` naming every missing file and how to download the data set
    (:func:`download_torchvision_files`).
    """
    if dataset not in TORCHVISION_LAYOUTS:
        raise ValueError(f"Unknown data set {dataset!r}; choose one of {sorted(TORCHVISION_LAYOUTS)}.")
    folder, train_files, test_files = TORCHVISION_LAYOUTS[dataset]
    missing = _missing(dataset, Path(root))
    if missing:
        raise FileNotFoundError(
            f"{dataset} is not under {Path(root).resolve()}: {len(missing)} of its {len(train_files + test_files)} files are missing from "
            f"{(Path(root) / folder).resolve()} ({', '.join(missing)}, each plain or .gz). Download them once "
            f"(no torchvision needed): python -c \"from lightning_ntk.demos import download_torchvision_files; "
            f"download_torchvision_files('{dataset}', '{root}')\""
        )
    folder = Path(root) / folder
    splits = [_read_split(dataset, folder, files) for files in (train_files, test_files)]
    tensors = []
    for split, (images, labels) in enumerate(splits):
        keep = np.flatnonzero(np.isin(labels, classes))
        if split == 0 and max_train is not None and len(keep) > max_train:
            keep = np.sort(np.random.default_rng(seed).choice(keep, max_train, replace=False))
        tensors += [torch.as_tensor(images[keep], dtype=dtype) / 255.0, torch.as_tensor(labels[keep] == classes[1], dtype=torch.long)]
    return tuple(tensors)
