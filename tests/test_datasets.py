"""Two-class subsets of MNIST and CIFAR-10 read from torchvision's on-disk layout, written here in the
real file formats (IDX, gzipped or not; CIFAR's pickled batches), and downloaded into it without
torchvision, from a local HTTP server (no network)."""

import dataclasses
import functools
import gzip
import hashlib
import importlib
import io
import pickle
import re
import socket
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ntk.demos import DownloadError, download_torchvision_files, load_torchvision_pair
from lightning_ntk.demos import data as demo_data
from conftest import write_fake_mnist

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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
    with pytest.raises(FileNotFoundError, match=r"CIFAR10 is not under .*data_batch_1.*download_torchvision_files\('CIFAR10', "):
        load_torchvision_pair("CIFAR10", tmp_path, (0, 1))
    # Offline with part of MNIST: every missing file is named, not only the first.
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"3 of its 4 files are missing .*\(train-images-idx3-ubyte, t10k-images-idx3-ubyte, "
                                                 r"t10k-labels-idx1-ubyte, each plain or \.gz\)"):
        load_torchvision_pair("MNIST", tmp_path, (0, 1))
    with pytest.raises(ValueError, match="Unknown data set 'SVHN'"):
        load_torchvision_pair("SVHN", tmp_path, (0, 1))


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving the folder ``served``; yields (base URL, folder)."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", served
    httpd.shutdown()
    httpd.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def serve_fake_mnist(served, monkeypatch):
    """Random MNIST files in torchvision's download format (gzipped IDX) on the server, with the
    download table's checksums set to theirs."""
    splits = write_fake_mnist(served)
    checksums = []
    for path in sorted((served / "MNIST" / "raw").iterdir()):
        data = path.read_bytes() if path.suffix == ".gz" else gzip.compress(path.read_bytes())
        (served / (path.name if path.suffix == ".gz" else path.name + ".gz")).write_bytes(data)
        checksums.append((path.name.removesuffix(".gz") + ".gz", md5(data)))
    source = demo_data.TORCHVISION_SOURCES["MNIST"]
    monkeypatch.setitem(demo_data.TORCHVISION_SOURCES, "MNIST", dataclasses.replace(source, files=tuple(checksums)))
    return splits


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_download_file_moves_the_checked_file_into_place(server, tmp_path):
    url, served = server
    content = b"fake data set file" * 1000
    (served / "file.bin").write_bytes(content)
    path = demo_data.download_file(url + "file.bin", tmp_path / "out" / "file.bin", md5(content))
    assert path.read_bytes() == content and leftovers(tmp_path / "out") == ["file.bin"]


def test_mnist_is_downloaded_into_torchvisions_layout_and_read_back(server, tmp_path, monkeypatch):
    url, served = server
    splits = serve_fake_mnist(served, monkeypatch)
    folder = download_torchvision_files("MNIST", tmp_path / "data", base_url=url)
    assert folder == tmp_path / "data" / "MNIST" / "raw"
    assert leftovers(folder) == sorted(name for name, _ in demo_data.TORCHVISION_SOURCES["MNIST"].files)
    _, _, x_test, y_test = load_torchvision_pair("MNIST", tmp_path / "data", (0, 1))
    images, labels = splits["t10k"]
    keep = np.isin(labels, (0, 1))
    torch.testing.assert_close(x_test[:, 0], torch.as_tensor(images[keep] / 255.0, dtype=torch.float32))
    # Files already there with the right checksum are kept: a second call needs no server.
    for path in served.glob("*.gz"):
        path.unlink()
    download_torchvision_files("MNIST", tmp_path / "data", base_url=url)


def test_cifar_archive_is_downloaded_and_unpacked(server, tmp_path, monkeypatch):
    url, served = server
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = pickle.dumps({b"data": rng.integers(0, 256, (10, 3072)).astype(np.uint8), b"labels": [0, 1] * 5})
            member = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            member.size = len(batch)
            tar.addfile(member, io.BytesIO(batch))
    (served / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    source = demo_data.TORCHVISION_SOURCES["CIFAR10"]
    monkeypatch.setitem(demo_data.TORCHVISION_SOURCES, "CIFAR10",
                        dataclasses.replace(source, files=(("cifar-10-python.tar.gz", md5(buffer.getvalue())),)))
    assert download_torchvision_files("CIFAR10", tmp_path, base_url=url) == tmp_path / "cifar-10-batches-py"
    x_train, y_train, x_test, y_test = load_torchvision_pair("CIFAR10", tmp_path, (0, 1))
    assert x_train.shape == (50, 3, 32, 32) and x_test.shape == (10, 3, 32, 32) and y_test.tolist() == [0, 1] * 5


def test_an_archive_with_paths_outside_its_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo("../outside")
        member.size = 1
        tar.addfile(member, io.BytesIO(b"x"))
    (tmp_path / "root").mkdir()
    with pytest.raises(DownloadError, match=r"'\.\./outside', a path outside its folder"):
        demo_data._unpack(archive, tmp_path / "root")
    assert not (tmp_path / "outside").exists()


def test_a_checksum_mismatch_is_refused_and_nothing_is_left_behind(server, tmp_path):
    url, served = server
    for name, _ in demo_data.TORCHVISION_SOURCES["MNIST"].files:
        (served / name).write_bytes(b"not the real file")
    with pytest.raises(DownloadError, match=rf"train-images-idx3-ubyte.gz: its MD5 is {md5(b'not the real file')}, not the expected f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        download_torchvision_files("MNIST", tmp_path / "data", base_url=url)
    assert leftovers(tmp_path / "data" / "MNIST" / "raw") == []


def test_no_network_names_the_url_and_the_manual_fix(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on: connections are refused, as without a network
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = tmp_path / "data"
    message = (rf"MNIST could not be downloaded\. Could not download http://127\.0\.0\.1:{port}/train-images-idx3-ubyte\.gz: no answer .*"
               rf"Without network access here, download train-images-idx3-ubyte\.gz from .* copy it to {re.escape(str(root.resolve()))}/MNIST/raw/"
               r"train-images-idx3-ubyte\.gz \(MD5 f68b3c2dcbeaaa9fbdd348bbdeb94873\) and run again")
    with pytest.raises(DownloadError, match=message):
        download_torchvision_files("MNIST", root, base_url=f"http://127.0.0.1:{port}", timeout=5)
    assert leftovers(root) == ["MNIST", "raw"]
    with pytest.raises(ValueError, match="Unknown data set 'SVHN'"):
        download_torchvision_files("SVHN", root)


def test_the_mnist_example_downloads_without_torchvision(server, tmp_path, monkeypatch):
    url, served = server
    serve_fake_mnist(served, monkeypatch)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    mnist2 = importlib.import_module("mnist2")
    data = mnist2.TorchvisionPairDataModule(data_dir=str(tmp_path / "data"), mirror=url)
    data.prepare_data()
    data.setup()
    assert len(data.train_set) > 0 and len(data.val_set) > 0
    assert "torchvision" not in sys.modules
