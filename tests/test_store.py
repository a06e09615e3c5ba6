"""The feature store: atomic entries, manifests that refuse other requests, verified contents, writers that share
a folder, retention, and clear errors on bad disks."""

import hashlib
import json
import multiprocessing
import os
import re
import resource
import signal
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_ntk as ln
from models import mlp
from lightning_ntk.store import FeatureStore, StoreError, StoreMismatchError, StoreWarning

REQUEST = {"kernel": "proj_trntk", "projection_dim": 8, "seed": 0, "reference": {"size": 6, "fingerprint": "ab12"}}
CALLBACK_OPTIONS = ("store_dir", "overwrite_store")  # names this layer does not have: its messages must not mention them
FORK = multiprocessing.get_context("fork")


def features(n=6, classes=3, k=8, seed=0):
    return torch.randn(n, classes, k, generator=torch.Generator().manual_seed(seed))


LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def plain(arrays):
    return {key: np.array(value) for key, value in arrays.items()}


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))


def test_round_trip_reads_back_memory_maps(tmp_path):
    store = FeatureStore(tmp_path / "store")
    train = features()
    out = store.save("epoch=0001", REQUEST, {"train": train, "labels": LABELS}, info={"epoch": 1})
    assert isinstance(out["train"], np.memmap) and out["train"].dtype == np.float32
    assert_same(out, {"train": train, "labels": LABELS})
    folder = tmp_path / "store" / "epoch=0001"
    manifest = json.loads((folder / "manifest.json").read_text())
    digest = hashlib.sha256((folder / "train.npy").read_bytes()).hexdigest()
    assert manifest["arrays"]["train"] == {"shape": [6, 3, 8], "dtype": "float32", "bytes": (folder / "train.npy").stat().st_size, "sha256": digest}
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
    expected = r"projection_dim: stored 8, requested 16; reference.size: stored 6, requested 7\. Delete that folder, or pass overwrite=True to FeatureStore.save"
    with pytest.raises(StoreMismatchError, match=expected) as refused:
        store.load("e", other)
    assert not any(option in str(refused.value) for option in CALLBACK_OPTIONS)
    with pytest.raises(StoreMismatchError, match=expected):
        store.save("e", other, {"train": features(seed=1)})
    store.save("e", other, {"train": features(seed=1)}, overwrite=True)
    np.testing.assert_array_equal(store.load("e", other)["train"], features(seed=1).numpy())
    assert leftovers(tmp_path) == []


def test_saving_an_entry_that_answers_the_request_already_returns_the_stored_one(tmp_path):
    store = FeatureStore(tmp_path)
    store.save("e", REQUEST, {"train": features(seed=0), "labels": LABELS})
    out = store.save("e", REQUEST, {"train": features(seed=1), "labels": LABELS})  # what another run computed meanwhile
    assert_same(out, {"train": features(seed=0), "labels": LABELS})
    out = store.save("e", REQUEST, {"train": features(seed=1), "labels": LABELS}, overwrite=True)
    assert_same(out, {"train": features(seed=1), "labels": LABELS})
    assert_same(store.load("e", REQUEST), {"train": features(seed=1), "labels": LABELS})
    assert leftovers(tmp_path) == []


# -- writers sharing one folder ---------------------------------------------------------------------


def test_concurrent_runs_of_one_request_never_crash_and_share_one_entry(tmp_path):
    store, runs = FeatureStore(tmp_path), 4
    computed = [{"train": features(seed=seed), "labels": LABELS} for seed in range(runs)]
    everyone_looked, results = FORK.Barrier(runs), FORK.Queue()

    def run(seed):
        try:
            assert store.load("e", REQUEST) is None  # every run finds no entry ...
            everyone_looked.wait(60)  # ... before any of them has written one
            results.put((seed, plain(store.save("e", REQUEST, computed[seed]))))
        except BaseException as err:  # noqa: BLE001 (reported to the test process)
            results.put((seed, repr(err)))

    processes = [FORK.Process(target=run, args=(seed,)) for seed in range(runs)]
    for process in processes:
        process.start()
    returned = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0] * runs
    assert all(isinstance(out, dict) for out in returned.values()), returned
    stored = plain(store.load("e", REQUEST))
    assert any(np.array_equal(stored["train"], run["train"].numpy()) for run in computed)  # one run's features won
    for out in returned.values():
        assert_same(out, stored)  # and every run goes on with them
    assert leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["e"]


class WaitsFor:
    """An array-like whose conversion signals that its writer has begun, then waits for a go-ahead: a slow write."""

    def __init__(self, started, proceed, value):
        self.started, self.proceed, self.value = started, proceed, value

    def __array__(self, dtype=None, copy=None):
        self.started.set()
        assert self.proceed.wait(60)
        return self.value


def test_a_writer_that_loses_the_race_returns_the_winners_entry_and_nobody_deletes_the_others_work(tmp_path):
    store = FeatureStore(tmp_path)
    started, proceed, results = FORK.Event(), FORK.Event(), FORK.Queue()
    slow = {"train": features(seed=1), "query": WaitsFor(started, proceed, features(2, seed=1).numpy())}
    fast = {"train": features(seed=0), "query": features(2, seed=0)}

    def slow_writer():
        try:
            results.put(plain(store.save("e", REQUEST, slow)))
        except BaseException as err:  # noqa: BLE001
            results.put(repr(err))

    process = FORK.Process(target=slow_writer)
    process.start()
    try:
        assert started.wait(60)
        [in_progress] = leftovers(tmp_path)
        assert in_progress.startswith(".e.tmp-")
        # Another run writes the same entry, and another, while the slow write is under way: its folder stays.
        assert_same(store.save("e", REQUEST, fast), fast)
        store.save("f", REQUEST, fast)
        assert leftovers(tmp_path) == [in_progress] and (tmp_path / in_progress / "train.npy").is_file()
    finally:
        proceed.set()
    out = results.get(timeout=60)
    process.join(60)
    assert process.exitcode == 0 and isinstance(out, dict), out
    assert_same(out, fast)  # the slow writer lost the race and goes on with the entry that is there
    assert_same(store.load("e", REQUEST), fast)
    assert leftovers(tmp_path) == []


class KillsTheProcess:
    """An array-like whose conversion kills the writing process with SIGKILL: a crash between writes."""

    def __array__(self, dtype=None, copy=None):
        os.kill(os.getpid(), signal.SIGKILL)


def killed_while_writing(store, name, overwrite=False):
    """Start writing entry ``name`` in a child process that dies half-way through."""
    pid = os.fork()
    if pid == 0:
        try:
            store.save(name, REQUEST, {"train": features(seed=1), "query": KillsTheProcess()}, overwrite=overwrite)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_write_killed_midway_leaves_no_complete_entry_and_a_rerun_completes(tmp_path):
    store = FeatureStore(tmp_path)
    store.save("epoch=0000", REQUEST, {"train": features(seed=0)})
    killed_while_writing(store, "epoch=0001")
    # The interrupted entry is not there; its half-written temporary folder is, and holds the first array.
    assert store.load("epoch=0001", REQUEST) is None and not store.path("epoch=0001").exists()
    [stale] = leftovers(tmp_path)
    assert stale.startswith(".epoch=0001.tmp-") and (tmp_path / stale / "train.npy").is_file()
    # An overwrite killed midway leaves the entry it was to replace as it was.
    killed_while_writing(store, "epoch=0000", overwrite=True)
    np.testing.assert_array_equal(store.load("epoch=0000", REQUEST)["train"], features(seed=0).numpy())
    # The rerun writes the entry completely and clears the leftovers of the dead writer.
    out = store.save("epoch=0001", REQUEST, {"train": features(seed=1), "query": features(2, seed=2)})
    np.testing.assert_array_equal(out["query"], features(2, seed=2).numpy())
    assert leftovers(tmp_path) == []


def test_temporary_folders_of_writers_that_cannot_be_checked_are_deleted_after_stale_after(tmp_path):
    store = FeatureStore(tmp_path, stale_after=3600)
    killed_while_writing(store, "a")
    [other_host] = leftovers(tmp_path)
    folder = tmp_path / other_host
    (folder / "writer.json").write_text(json.dumps({"pid": 1, "host": "another-host.example"}))  # its process cannot be looked up
    store.save("b", REQUEST, {"train": features()})
    assert leftovers(tmp_path) == [other_host]
    (folder / "writer.json").unlink()  # a writer that has just created its folder, not yet its writer.json
    store.save("c", REQUEST, {"train": features()})
    assert leftovers(tmp_path) == [other_host]
    long_ago = time.time() - 3601
    for path in (folder, *folder.iterdir()):
        os.utime(path, (long_ago, long_ago))
    store.save("d", REQUEST, {"train": features()})
    assert leftovers(tmp_path) == []


# -- damaged entries ------------------------------------------------------------------------------


def _rewrite_manifest(change):
    def damage(folder):
        path = folder / "manifest.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return damage


def _older_format(manifest):
    for meta in manifest["arrays"].values():
        del meta["bytes"], meta["sha256"]
    return dict(manifest, format=1)


DAMAGES = {
    "same-shape zeros": (lambda f: np.save(f / "train.npy", np.zeros((6, 3, 8), np.float32)), r"train.npy does not hold the bytes"),
    "same-shape noise": (lambda f: np.save(f / "train.npy", features(seed=9).numpy()), r"train.npy does not hold the bytes"),
    "permuted labels": (lambda f: np.save(f / "labels.npy", LABELS.roll(1).numpy()), r"labels.npy does not hold the bytes"),
    "0-byte array": (lambda f: (f / "train.npy").write_bytes(b""), r"train.npy does not hold the bytes"),
    "truncated array": (lambda f: (f / "train.npy").write_bytes((f / "train.npy").read_bytes()[:100]), r"train.npy does not hold the bytes"),
    "missing array": (lambda f: (f / "train.npy").unlink(), r"train.npy cannot be read \(.*No such file"),
    "manifest without arrays": (_rewrite_manifest(lambda m: {k: v for k, v in m.items() if k != "arrays"}), r"lacks the request, info or description"),
    "manifest a JSON list": (_rewrite_manifest(lambda m: [m]), r"manifest.json is not a JSON object"),
    "manifest not JSON": (lambda f: (f / "manifest.json").write_text('{"format": 2, "req'), r"manifest.json cannot be read"),
    "no manifest": (lambda f: (f / "manifest.json").unlink(), r"it has no manifest.json"),
    "manifest of format 1": (_rewrite_manifest(_older_format), r"has format 1; this version reads format 2"),
    "manifest with another shape": (
        _rewrite_manifest(lambda m: {**m, "arrays": {**m["arrays"], "train": {**m["arrays"]["train"], "shape": [3, 6, 8]}}}),
        r"train.npy has shape \[6, 3, 8\] and dtype float32, its manifest says \[3, 6, 8\]",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_entry_is_set_aside_with_a_warning_and_computed_again(tmp_path, damage):
    store = FeatureStore(tmp_path)
    store.save("e", REQUEST, {"train": features(), "labels": LABELS})
    change, reason = DAMAGES[damage]
    change(store.path("e"))
    damaged_files = {p.name: p.read_bytes() for p in store.path("e").iterdir()}
    with pytest.warns(StoreWarning, match=rf"entry {tmp_path}/e cannot be used: .*{reason}.*moved to {tmp_path}/\.e\.damaged-\w+ ") as warned:
        assert store.load("e", REQUEST) is None
    assert not any(option in str(warned[0].message) for option in CALLBACK_OPTIONS)
    [aside] = leftovers(tmp_path)  # nothing is lost: the damaged files are kept aside
    assert {p.name: p.read_bytes() for p in (tmp_path / aside).iterdir()} == damaged_files
    recomputed = {"train": features(seed=3), "labels": LABELS}
    assert_same(store.save("e", REQUEST, recomputed), recomputed)  # the rerun writes it without overwrite=True
    assert_same(store.load("e", REQUEST), recomputed)


def test_an_entry_without_an_array_the_caller_needs_is_computed_again(tmp_path):
    store = FeatureStore(tmp_path)
    store.save("e", REQUEST, {"train": features()})
    assert set(store.load("e", REQUEST, required=("train",))) == {"train"}
    with pytest.warns(StoreWarning, match=r"cannot be used: it lacks the arrays 'query'"):
        assert store.load("e", REQUEST, required=("train", "query")) is None
    complete = {"train": features(), "query": features(2)}
    assert_same(store.save("e", REQUEST, complete), complete)
    # An older entry that lacks an array the writer brings is replaced the same way by save itself.
    store.save("f", REQUEST, {"train": features()})
    with pytest.warns(StoreWarning, match="lacks the arrays 'query'"):
        assert_same(store.save("f", REQUEST, complete), complete)


def test_a_damaged_entry_that_cannot_be_moved_aside_is_refused_with_the_fix():
    with tempfile.TemporaryDirectory() as scratch:  # outside pytest's private folder, so that another user can reach it
        root = Path(scratch) / "store"
        store = FeatureStore(root)
        store.save("e", REQUEST, {"train": features()})
        np.save(store.path("e") / "train.npy", np.zeros((6, 3, 8), np.float32))
        Path(scratch).chmod(0o755)
        root.chmod(0o555)  # a read-only store: its entries cannot be renamed
        results = FORK.Queue()

        def load_as_an_ordinary_user():
            if os.geteuid() == 0:  # root renames anyway: drop to nobody
                os.setgid(65534), os.setuid(65534)
            try:
                store.load("e", REQUEST)
                results.put("no error")
            except StoreError as err:
                results.put(str(err))

        process = FORK.Process(target=load_as_an_ordinary_user)
        process.start()
        message = results.get(timeout=60)
        process.join(60)
        root.chmod(0o755)
    assert re.fullmatch(
        rf"The feature store entry {root}/e cannot be used: train.npy does not hold the bytes .*; and it cannot be moved aside "
        rf"\(Permission denied\)\. Delete the folder {root}/e to compute it again\.",
        message,
    ), message


def test_a_damaged_entry_is_not_set_aside_once_another_writer_has_replaced_it(tmp_path):
    store = FeatureStore(tmp_path)
    store.save("e", REQUEST, {"train": features(seed=0)})
    damaged_inode = store.path("e").stat().st_ino
    store.save("e", REQUEST, {"train": features(seed=1)}, overwrite=True)  # a fresh entry, written meanwhile
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store._set_aside(store.path("e"), damaged_inode, "found damaged before the new entry came")
    np.testing.assert_array_equal(store.load("e", REQUEST)["train"], features(seed=1).numpy())
    assert leftovers(tmp_path) == []


# -- what is stored --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float64, torch.int64, torch.bool])
def test_tensors_of_every_dtype_round_trip_bit_for_bit(tmp_path, dtype):
    store = FeatureStore(tmp_path)
    tensor = (features() * 100).to(dtype)
    out = store.save("e", dict(REQUEST, dtype=dtype), {"train": tensor})["train"]
    again = store.load("e", dict(REQUEST, dtype=dtype))["train"]
    for got in (out, again):
        got = torch.as_tensor(got)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8))
    manifest = json.loads((store.path("e") / "manifest.json").read_text())
    assert manifest["request"]["dtype"] == str(dtype) and manifest["arrays"]["train"]["dtype"] == str(dtype).removeprefix("torch.")
    half = ln.kernel_from_features(torch.as_tensor(again).float())
    torch.testing.assert_close(half, ln.kernel_from_features(tensor.float()))


def test_requests_with_dtypes_and_numpy_scalars_are_recorded_and_compared(tmp_path):
    store = FeatureStore(tmp_path)
    request = dict(REQUEST, dtype=torch.bfloat16, device=torch.device("cpu"), numpy_dtype=np.dtype("float16"), scale=np.float32(0.5), margin=float("nan"))
    store.save("e", request, {"train": features()}, info={"epoch": np.int64(3)})
    manifest = json.loads((store.path("e") / "manifest.json").read_text())
    assert (manifest["request"]["dtype"], manifest["request"]["device"], manifest["request"]["numpy_dtype"]) == ("torch.bfloat16", "cpu", "float16")
    assert manifest["request"]["scale"] == 0.5 and manifest["info"] == {"epoch": 3}
    assert store.load("e", dict(request, margin=float("nan"))) is not None  # NaN answers NaN
    with pytest.raises(StoreMismatchError, match="dtype: stored 'torch.bfloat16', requested 'torch.float16'"):
        store.load("e", dict(request, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"The request cannot be recorded in a feature store manifest: object <object object"):
        store.save("f", dict(REQUEST, model=object()), {"train": features()})


def test_bad_names_and_arrays_are_refused_before_anything_is_written(tmp_path):
    store = FeatureStore(tmp_path)
    for name in ("", "../e", "a/b", ".hidden"):
        with pytest.raises(ValueError, match=rf"The entry name {name!r} cannot name a file"):
            store.save(name, REQUEST, {"train": features()})
    with pytest.raises(ValueError, match=r"The array name 'a/b' cannot name a file"):
        store.save("e", REQUEST, {"a/b": features()})
    with pytest.raises(TypeError, match=r"The array 'train' holds Python objects"):
        store.save("e", REQUEST, {"train": np.array([{}, None], dtype=object)})
    assert list(tmp_path.iterdir()) == []


def test_retain_keeps_the_newest_entries_by_epoch_and_size_bytes_counts_the_files(tmp_path):
    store = FeatureStore(tmp_path)
    for epoch in (4, 0, 3, 1, 2):  # written out of order: the epoch, not the writing order, says which are newest
        store.save(f"epoch={epoch:04d}-ab12", REQUEST, {"train": features(seed=epoch)}, info={"epoch": epoch})
    store.save("other", REQUEST, {"train": features()})
    (tmp_path / "epoch=0000-broken").mkdir()  # no manifest: not a complete entry, left alone
    held = store.load("epoch=0000-ab12", REQUEST)

    def file_bytes(folder):
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    assert store.size_bytes() == file_bytes(tmp_path) > 0
    retired = ["epoch=0000-ab12", "epoch=0001-ab12", "epoch=0002-ab12"]
    freed = sum(file_bytes(store.path(name)) for name in retired)
    before = store.size_bytes()
    assert store.retain(2, prefix="epoch=") == retired
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0000-broken", "epoch=0003-ab12", "epoch=0004-ab12", "other"]
    assert store.size_bytes() == before - freed == file_bytes(tmp_path)
    np.testing.assert_array_equal(held["train"], features(seed=0).numpy())  # arrays already read stay readable
    assert store.retain(0) == ["other", "epoch=0003-ab12", "epoch=0004-ab12"]  # no epoch: older than any with one
    assert FeatureStore(tmp_path / "absent").retain(1) == [] and FeatureStore(tmp_path / "absent").size_bytes() == 0
    with pytest.raises(ValueError, match="keep_last must be a non-negative integer, not -1"):
        store.retain(-1)


def test_retain_counts_and_deletes_only_the_entries_whose_info_matches(tmp_path):
    """Runs sharing a folder each keep their own newest entries: one run's retain never deletes another's."""
    store = FeatureStore(tmp_path)
    for run, epochs in (("a", (0, 1, 2)), ("b", (0, 1))):
        for epoch in epochs:
            store.save(f"epoch={epoch:04d}-{run}", REQUEST, {"train": features(seed=epoch)}, info={"epoch": epoch, "run": run})
    assert store.retain(1, prefix="epoch=", info={"run": "b"}) == ["epoch=0000-b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0000-a", "epoch=0001-a", "epoch=0001-b", "epoch=0002-a"]
    assert store.retain(1, prefix="epoch=", info={"run": "a"}) == ["epoch=0000-a", "epoch=0001-a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0001-b", "epoch=0002-a"]


def test_pipeline_runs_of_other_weights_or_options_share_a_store_side_by_side(tmp_path):
    """Train more and run again, or run with another K: each run's entry is named by its weights and options."""
    x, y = torch.randn(24, 6, generator=torch.Generator().manual_seed(0)), torch.arange(24) % 3
    model, store = mlp(), FeatureStore(tmp_path)
    first = ln.FidelityPipeline(model, projection={"dim": 16}).run((x, y), (x, y), store=store)
    with torch.no_grad():
        model[0].weight.add_(0.1)  # trained further
    later = ln.FidelityPipeline(model, projection={"dim": 16}).run((x, y), (x, y), store=store)
    wider = ln.FidelityPipeline(model, projection={"dim": 24}).run((x, y), (x, y), store=store)
    again = ln.FidelityPipeline(model, projection={"dim": 16}).run((x, y), (x, y), store=store)
    assert [c.record.store_reused for c in (first, later, wider, again)] == [False, False, False, True]
    assert first.record.parameters != later.record.parameters
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and all(name.startswith("checkpoint-") for name in names)
    assert sum(name.startswith(f"checkpoint-{later.record.parameters}-") for name in names) == 2  # K 16 and K 24, side by side
    assert leftovers(tmp_path) == []


# -- bad disks ------------------------------------------------------------------------------------


def test_unwritable_folder(tmp_path):
    (tmp_path / "a_file").write_text("")
    store = FeatureStore(tmp_path / "a_file" / "store")
    with pytest.raises(StoreError, match=r"a_file/store is not writable.*Use a folder this process can write to") as refused:
        store.check_writable()
    assert not any(option in str(refused.value) for option in CALLBACK_OPTIONS)
    assert store.load("e", REQUEST) is None
    with pytest.raises(StoreError, match="not writable"):
        store.save("e", REQUEST, {"train": features()})


def test_full_disk_gives_a_clear_error_and_leaves_the_store_as_it_was(tmp_path):
    store = FeatureStore(tmp_path)
    store.save("e", REQUEST, {"train": features()})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # files may not grow past 4 KiB: writes fail like on a full disk
    try:
        with pytest.raises(StoreError, match=r"disk is full.*Free space there, move the store to a larger disk, or store less") as refused:
            store.save("f", REQUEST, {"train": features(100, 10, 64)})
        with pytest.raises(StoreError, match=r"disk is full"):
            store.save("e", REQUEST, {"train": features(100, 10, 64)}, overwrite=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not any(option in str(refused.value) for option in CALLBACK_OPTIONS)
    assert store.load("f", REQUEST) is None and leftovers(tmp_path) == []
    np.testing.assert_array_equal(store.load("e", REQUEST)["train"], features().numpy())  # the failed overwrite kept it


def streamed(store, name, arrays, block=4, dtype=None, request=REQUEST):
    """Write ``arrays`` through an EntryWriter, the first one block by block (allocated in ``dtype``)."""
    (first, values), *rest = arrays.items()
    with store.writer(name, request) as writer:
        writer.allocate(first, tuple(values.shape), dtype or values.dtype)
        for start in range(0, len(values), block):
            writer.write(first, start, values[start : start + block])
        for key, value in rest:
            writer.put(key, value)
        return writer.publish()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_an_entry_written_block_by_block_equals_a_saved_one_bit_for_bit(tmp_path, dtype):
    arrays = {"train": (features(10) * 100).to(dtype), "labels": torch.arange(10)}
    saved = FeatureStore(tmp_path / "saved").save("e", REQUEST, arrays)
    out = streamed(FeatureStore(tmp_path / "streamed"), "e", arrays)
    for key in arrays:
        assert (tmp_path / "streamed" / "e" / f"{key}.npy").read_bytes() == (tmp_path / "saved" / "e" / f"{key}.npy").read_bytes()
        assert torch.equal(torch.as_tensor(out[key]).view(torch.uint8), torch.as_tensor(saved[key]).view(torch.uint8))
    assert (tmp_path / "streamed" / "e" / "manifest.json").read_text() == (tmp_path / "saved" / "e" / "manifest.json").read_text()
    assert leftovers(tmp_path / "streamed") == []


def test_a_streamed_array_widens_on_disk_when_a_block_needs_a_wider_dtype(tmp_path):
    values = features(10)
    wide = torch.cat([values[:4].half(), values[4:].bfloat16()])  # the second block overflowed float16 and came wider
    with FeatureStore(tmp_path).writer("e", REQUEST) as writer:
        writer.allocate("train", tuple(values.shape), torch.float16)
        writer.write("train", 0, wide[:4].half())
        writer.write("train", 4, values[4:].bfloat16())
        assert writer.dtype("train") == torch.bfloat16
        out = writer.publish()
    assert torch.equal(torch.as_tensor(out["train"]), torch.cat([values[:4].half().bfloat16(), values[4:].bfloat16()]))
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["manifest.json", "train.npy", "writer.json"]  # no narrow copy is left


def test_an_interrupted_streamed_write_leaves_no_entry_and_the_next_one_completes(tmp_path):
    store = FeatureStore(tmp_path)
    with pytest.raises(RuntimeError, match="featurizing failed"):
        with store.writer("e", REQUEST) as writer:
            writer.allocate("train", (10, 3, 8), torch.float32)
            writer.write("train", 0, features(4))
            raise RuntimeError("featurizing failed")
    assert store.load("e", REQUEST) is None and leftovers(tmp_path) == []
    # A writer killed midway (no exception handler runs) leaves only a temporary folder, which is never an entry.
    pid = os.fork()
    if pid == 0:
        writer = store.writer("e", REQUEST)
        writer.allocate("train", (10, 3, 8), torch.float32)
        writer.write("train", 0, features(4))
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert store.load("e", REQUEST) is None and [p.startswith(".e.tmp-") for p in leftovers(tmp_path)] == [True]
    out = streamed(store, "e", {"train": features(10)})
    np.testing.assert_array_equal(out["train"], features(10).numpy())
    assert leftovers(tmp_path) == []  # the dead writer's folder is cleared


def test_a_streamed_write_refuses_unallocated_and_repeated_arrays(tmp_path):
    with FeatureStore(tmp_path).writer("e", REQUEST) as writer:
        with pytest.raises(ValueError, match=r"call allocate\('train', shape, dtype\) first"):
            writer.write("train", 0, features(2))
        writer.put("labels", LABELS)
        with pytest.raises(ValueError, match="written already"):
            writer.allocate("labels", (6,), torch.int64)
    assert leftovers(tmp_path) == []
