"""Two-class subsets of MNIST and CIFAR-10 read from torchvision's on-disk layout, written here in the
real file formats (IDX, gzipped or not; CIFAR's pickled batches)."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from lightning_ntk.demos import load_torchvision_pair


def write_idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_fake_mnist(root, num_train=300, num_test=100, seed=0):
    """Random 28×28 images with labels 0-9, as torchvision's MNIST download leaves them."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    splits = {}
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        images[labels == 1, :, 14:] = 255  # make "1" learnable
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, gz=prefix == "train")
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        splits[prefix] = images, labels
    return splits


def test_mnist_pair_from_idx_files(tmp_path):
    splits = write_fake_mnist(tmp_path)
    x_train, y_train, x_test, y_test = load_torchvision_pair("MNIST", tmp_path, (0, 1))
    images, labels = splits["t10k"]
    keep = np.isin(labels, (0, 1))
    assert x_test.shape == (keep.sum(), 1, 28, 28) and x_test.dtype == torch.float32
    torch.testing.assert_close(x_test[:, 0], torch.as_tensor(images[keep] / 255.0, dtype=torch.float32))
    assert y_test.tolist() == (labels[keep] == 1).astype(int).tolist()
    assert len(x_train) == np.isin(splits["train"][1], (0, 1)).sum()
    subset = load_torchvision_pair("MNIST", tmp_path, (0, 1), max_train=20, seed=3)
    assert len(subset[0]) == 20 and torch.equal(subset[0], load_torchvision_pair("MNIST", tmp_path, (0, 1), max_train=20, seed=3)[0])


def test_cifar_pair_from_pickled_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072)).astype(np.uint8), b"labels": rng.integers(0, 10, 20).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
        batches[name] = batch
    x_train, y_train, x_test, y_test = load_torchvision_pair("CIFAR10", tmp_path, (3, 5))
    labels = np.asarray(batches["test_batch"][b"labels"])
    keep = np.isin(labels, (3, 5))
    assert x_test.shape == (keep.sum(), 3, 32, 32)
    expected = batches["test_batch"][b"data"][keep].reshape(-1, 3, 32, 32) / 255.0
    torch.testing.assert_close(x_test, torch.as_tensor(expected, dtype=torch.float32))
    assert y_test.tolist() == (labels[keep] == 5).astype(int).tolist()
    assert len(x_train) == sum(np.isin(batches[f"data_batch_{i}"][b"labels"], (3, 5)).sum() for i in range(1, 6))


def test_missing_data_says_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR10 is not under .*data_batch_1.*torchvision.datasets.CIFAR10\("):
        load_torchvision_pair("CIFAR10", tmp_path, (0, 1))
    with pytest.raises(ValueError, match="Unknown data set 'SVHN'"):
        load_torchvision_pair("SVHN", tmp_path, (0, 1))
