"""The feature store: atomic entries, manifests that refuse other requests, clear errors on bad disks."""

import json
import os
import resource
import signal

import numpy as np
import pytest
import torch

import lightning_ntk as ln
from lightning_ntk.store import FeatureStore, StoreError, StoreMismatchError

REQUEST = {"kernel": "proj_trntk", "projection_dim": 8, "seed": 0, "reference": {"size": 6, "fingerprint": "ab12"}}


def features(n=6, classes=3, k=8, seed=0):
    return torch.randn(n, classes, k, generator=torch.Generator().manual_seed(seed))


def leftovers(root):
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_round_trip_reads_back_memory_maps(tmp_path):
    store = FeatureStore(tmp_path / "store")
    train, labels = features(), torch.tensor([0, 1, 2, 0, 1, 2])
    out = store.save("epoch=0001", REQUEST, {"train": train, "labels": labels}, info={"epoch": 1})
    assert isinstance(out["train"], np.memmap) and out["train"].dtype == np.float32
    np.testing.assert_array_equal(out["train"], train.numpy())
    np.testing.assert_array_equal(out["labels"], labels.numpy())
    manifest = json.loads((tmp_path / "store" / "epoch=0001" / "manifest.json").read_text())
    assert manifest["arrays"]["train"] == {"shape": [6, 3, 8], "dtype": "float32"}
    assert manifest["info"] == {"epoch": 1} and manifest["request"] == REQUEST
    assert leftovers(tmp_path / "store") == []
    # Kernels stream from the memory maps exactly as from the tensors.
    torch.testing.assert_close(ln.kernel_from_features(out["train"], block_size=4), ln.kernel_from_features(train))


def test_matching_request_is_reused_and_other_requests_are_refused(tmp_path):
    store = FeatureStore(tmp_path)
    assert store.load("e", REQUEST) is None
    store.save("e", REQUEST, {"train": features()})
    same = dict(REQUEST, reference={"fingerprint": "ab12", "size": 6})  # key order does not matter
    np.testing.assert_array_equal(store.load("e", same)["train"], features().numpy())
    other = dict(REQUEST, projection_dim=16, reference={"size": 7, "fingerprint": "ab12"})
    with pytest.raises(StoreMismatchError, match=r"projection_dim: stored 8, requested 16; reference.size: stored 6, requested 7.*overwrite_store=True"):
        store.load("e", other)
    with pytest.raises(StoreError, match="exists already"):
        store.save("e", other, {"train": features(seed=1)})
    store.save("e", other, {"train": features(seed=1)}, overwrite=True)
    np.testing.assert_array_equal(store.load("e", other)["train"], features(seed=1).numpy())
    assert leftovers(tmp_path) == []


class KillsTheProcess:
    """An array-like whose conversion kills the writing process with SIGKILL: a crash between writes."""

    def __array__(self, dtype=None, copy=None):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_write_killed_midway_leaves_no_complete_entry_and_a_rerun_completes(tmp_path):
    store = FeatureStore(tmp_path)
    pid = os.fork()
    if pid == 0:  # the child writes one entry, then dies half-way through the second
        try:
            store.save("epoch=0000", REQUEST, {"train": features(seed=0)})
            store.save("epoch=0001", REQUEST, {"train": features(seed=1), "query": KillsTheProcess()})
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    # The interrupted entry is not there; its half-written temporary folder is, and holds the first array.
    assert store.load("epoch=0001", REQUEST) is None and not store.path("epoch=0001").exists()
    [stale] = leftovers(tmp_path)
    assert stale.startswith(".epoch=0001.tmp-") and (tmp_path / stale / "train.npy").is_file()
    np.testing.assert_array_equal(store.load("epoch=0000", REQUEST)["train"], features(seed=0).numpy())
    # The rerun writes the entry completely and clears the leftovers.
    out = store.save("epoch=0001", REQUEST, {"train": features(seed=1), "query": features(2, seed=2)})
    np.testing.assert_array_equal(out["query"], features(2, seed=2).numpy())
    assert leftovers(tmp_path) == []


def test_unwritable_folder(tmp_path):
    (tmp_path / "a_file").write_text("")
    store = FeatureStore(tmp_path / "a_file" / "store")
    with pytest.raises(StoreError, match=r"a_file/store is not writable.*store_dir="):
        store.check_writable()
    with pytest.raises(StoreError, match="not writable"):
        store.save("e", REQUEST, {"train": features()})


def test_full_disk_gives_a_clear_error_and_leaves_nothing(tmp_path):
    store = FeatureStore(tmp_path)
    store.check_writable()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # files may not grow past 4 KiB: writes fail like on a full disk
    try:
        with pytest.raises(StoreError, match=r"disk is full.*store_dir=.*projection_dim"):
            store.save("e", REQUEST, {"train": features(100, 10, 64)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert store.load("e", REQUEST) is None and leftovers(tmp_path) == []


def test_damaged_entry_is_reported(tmp_path):
    store = FeatureStore(tmp_path)
    store.save("e", REQUEST, {"train": features()})
    path = store.path("e") / "train.npy"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StoreError, match=r"train.npy.*delete .* to recompute"):
        store.load("e", REQUEST)
