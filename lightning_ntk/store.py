"""Feature store: named folders of ``.npy`` arrays with a ``manifest.json`` that says what they hold.

Featurizing is the expensive stage, so its results are kept on disk and read back as memory maps
(``kernel_blocks`` streams kernel rows from them). A manifest records the *request* the arrays answer
(kernel, K, projector, seed, parameter fingerprint, data fingerprints, dtype, library version) and each
array's shape, dtype, size and SHA-256; an entry is reused only for the same request and only if its
files still hold those bytes.

Several runs may share one store folder. What lies in it:

- ``<name>/``: a complete entry. It is written in a hidden temporary folder, its manifest last, and moved
  into place with one atomic rename that fails while another complete entry holds the name, so an
  interrupted write never leaves an entry that reads as complete, and two writers of the same request
  never clobber each other: the later one keeps and returns the entry that is there.
- ``.<name>.tmp-<id>/``: a write in progress; its ``writer.json`` names the writing process and host.
  Other writers delete it only once it is abandoned: its process is gone (same host), or nothing in it
  has changed for ``stale_after`` seconds.
- ``.<name>.trash-<id>/``: an entry being deleted (replaced, or retired by :meth:`FeatureStore.retain`).
- ``.<name>.damaged-<id>/``: an entry that failed verification, set aside for inspection and never deleted
  by the store; :meth:`FeatureStore.load` treats the name as absent, so its features are computed again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

MANIFEST = "manifest.json"
WRITER = "writer.json"
FORMAT = 2
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_NAME_TAKEN = {errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR}
_ARRAY_FIELDS = {"shape", "dtype", "bytes", "sha256"}
_HIDDEN = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|trash|damaged)-[0-9a-f]{32}")
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class StoreError(RuntimeError):
    """The feature store cannot be written or read as asked."""


class StoreMismatchError(StoreError):
    """A stored entry answers a different request than the current one."""


class StoreWarning(UserWarning):
    """A stored entry could not be used and was set aside; its features are computed again."""


class _Damaged(Exception):
    """An entry that cannot be used as it is; the message says why."""


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, np.dtype, os.PathLike)):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} is not a str, number, bool, None, list or dict")


def _jsonable(value: Any, what: str) -> Any:
    """The value as it reads back from JSON (tuples become lists, dtypes strings), so that requests compare equal."""
    try:
        return json.loads(json.dumps(value, default=_json_default))
    except (TypeError, ValueError) as err:
        raise TypeError(f"The {what} cannot be recorded in a feature store manifest: {err}.") from err


def request_digest(request: Mapping[str, Any], length: int = 8) -> str:
    """A short digest of a request, for entry names: requests that differ get different names, so that their
    entries live side by side in one store (the manifest still holds the whole request, which ``load`` compares)."""
    text = json.dumps(_jsonable(dict(request), "request"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _differences(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(stored) | set(wanted), key=str):
            out += _differences(stored.get(key), wanted.get(key), f"{prefix}{key}.")
        return out
    both_nan = stored != stored and wanted != wanted
    return [] if stored == wanted or both_nan else [f"{prefix.rstrip('.')}: stored {stored!r}, requested {wanted!r}"]


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or os.sep in name or "\0" in name:
        raise ValueError(f"The {what} {name!r} cannot name a file: use a non-empty string without '/' that does not start with '.'.")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_array(key: str, value: Any) -> tuple[np.ndarray, dict[str, str]]:
    """The array to write and its recorded dtype. Tensors of dtypes numpy lacks (bfloat16, float8) are
    written as their raw bits, an integer type of the same size named under ``bits``."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        try:
            array = tensor.numpy()
        except TypeError:
            bits = tensor.view(_INT_OF_SIZE[tensor.element_size()]).numpy()
            return bits, {"dtype": str(tensor.dtype).removeprefix("torch."), "bits": str(bits.dtype)}
    else:
        array = np.asarray(value)
    if array.dtype.hasobject:
        raise TypeError(f"The array {key!r} holds Python objects; the feature store keeps numeric arrays and tensors only.")
    return array, {"dtype": str(array.dtype)}


def _write_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    """``np.save`` through ordinary file writes, so that a full disk raises ``OSError`` with its errno
    (``ndarray.tofile`` reports a short write without one), flushed to the disk; returns the file's size and SHA-256."""
    array = np.asarray(array, order="C")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for part in (header.getbuffer(), memoryview(array.reshape(-1).view(np.uint8))):
            f.write(part)
            digest.update(part)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _file_sha256(path: Path, chunk_bytes: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(memoryview(buffer)[:n])
    return digest.hexdigest()


def _process_exists(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _remove(path: Path) -> None:
    """Delete a folder or file that may be deleted concurrently by another process."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _read_manifest(folder: Path) -> dict:
    """The manifest of the entry in ``folder``, checked to have the fields the store relies on."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise _Damaged(f"it has no {MANIFEST}") from None
    except (OSError, ValueError) as err:
        raise _Damaged(f"its {MANIFEST} cannot be read ({err})") from None
    if not isinstance(manifest, dict):
        raise _Damaged(f"its {MANIFEST} is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise _Damaged(f"its {MANIFEST} has format {manifest.get('format')!r}; this version reads format {FORMAT}")
    arrays = manifest.get("arrays")
    if not (
        "request" in manifest
        and isinstance(manifest.get("info"), dict)
        and isinstance(arrays, dict)
        and all(isinstance(meta, dict) and _ARRAY_FIELDS <= meta.keys() for meta in arrays.values())
    ):
        raise _Damaged(f"its {MANIFEST} lacks the request, info or description of its arrays")
    return manifest


def _open_arrays(folder: Path, manifest: dict, verify: bool) -> dict[str, Any]:
    """The entry's arrays as copy-on-write memory maps (writable in memory, never on disk); those stored as
    raw bits come back as tensors of their dtype viewing the map. ``verify`` checks each file's SHA-256."""
    arrays = {}
    for key, meta in manifest["arrays"].items():
        path = folder / f"{key}.npy"
        try:
            if verify and (path.stat().st_size != meta["bytes"] or _file_sha256(path) != meta["sha256"]):
                raise _Damaged(f"{path.name} does not hold the bytes its manifest records (its SHA-256 differs)")
            array = np.load(path, mmap_mode="c")
        except (OSError, ValueError, EOFError) as err:
            raise _Damaged(f"{path.name} cannot be read ({err})") from None
        if list(array.shape) != meta["shape"] or str(array.dtype) != meta.get("bits", meta["dtype"]):
            raise _Damaged(f"{path.name} has shape {list(array.shape)} and dtype {array.dtype}, its manifest says {meta['shape']} and {meta['dtype']}")
        if "bits" in meta:
            dtype = getattr(torch, str(meta["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise _Damaged(f"its manifest records {path.name} as of the unknown dtype {meta['dtype']!r}")
            array = torch.from_numpy(array).view(dtype)
        arrays[key] = array
    return arrays


def _write_error(err: OSError, final: Path) -> StoreError:
    if err.errno in _DISK_FULL:
        return StoreError(
            f"The disk is full: writing features to {final} failed ({err.strerror}). Free space there, move the "
            "store to a larger disk, or store less (fewer or smaller arrays, e.g. in float16)."
        )
    return StoreError(f"Writing features to {final} failed ({err}); use a store folder this process can write to.")


class FeatureStore:
    """A folder of entries ``root/<name>/{<array>.npy, manifest.json}``, safe to share between processes.

    ``stale_after`` (seconds): how long a temporary folder of a process this host cannot check (another host's)
    may stay unchanged before other writers treat it as abandoned and delete it.
    """

    def __init__(self, root: str | os.PathLike, stale_after: float = 24 * 3600):
        self.root = Path(root)
        self.stale_after = stale_after

    def path(self, name: str) -> Path:
        return self.root / name

    def check_writable(self) -> None:
        """Create the root folder and write a probe file, or say clearly why that is impossible."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise StoreError(
                f"The feature store folder {self.root} is not writable ({err.strerror or err}). Use a folder this process can write to."
            ) from err

    def manifest(self, name: str) -> dict | None:
        """The manifest of entry ``name``, or None when there is none; :class:`StoreError` if it is damaged."""
        folder = self.path(name)
        if not folder.exists():
            return None
        try:
            return _read_manifest(folder)
        except _Damaged as damage:
            raise StoreError(f"The feature store entry {folder} cannot be used: {damage}. Delete the folder {folder} to compute it again.") from None

    def load(self, name: str, request: Mapping[str, Any], required: Iterable[str] = ()) -> dict[str, Any] | None:
        """The arrays of entry ``name`` as memory maps if it answers ``request`` and holds at least the
        arrays ``required``; raises :class:`StoreMismatchError` if it answers another request.

        None if there is no such entry, or if it is damaged (a file changed or missing, an unreadable
        manifest, no manifest) or lacks a required array: such an entry is moved aside to a hidden
        ``.<name>.damaged-<id>`` folder with a :class:`StoreWarning`, so that the caller computes it again."""
        _check_name(name, "entry name")
        folder = self.path(name)
        try:
            inode = folder.stat().st_ino
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            manifest = _read_manifest(folder)
            diffs = _differences(manifest["request"], _jsonable(dict(request), "request"))
            if diffs:
                raise StoreMismatchError(
                    f"The feature store entry {folder} holds features for a different request: " + "; ".join(diffs)
                    + ". Delete that folder, or pass overwrite=True to FeatureStore.save to replace it."
                )
            missing = [key for key in required if key not in manifest["arrays"]]
            if missing:
                raise _Damaged(f"it lacks the arrays {', '.join(map(repr, missing))}")
            return _open_arrays(folder, manifest, verify=True)
        except _Damaged as damage:
            self._set_aside(folder, inode, str(damage))
            return None

    def save(
        self,
        name: str,
        request: Mapping[str, Any],
        arrays: Mapping[str, Any],
        info: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Write ``arrays`` (tensors or array-likes; bfloat16 and float8 tensors as their raw bits) as entry
        ``name`` atomically and return them read back as memory maps.

        Without ``overwrite``, an entry that already answers ``request`` with these arrays (another run
        sharing the store wrote it first) is kept and its arrays returned instead; one answering another
        request raises :class:`StoreMismatchError`. With ``overwrite`` the entry there is replaced."""
        _check_name(name, "entry name")
        keys = tuple(arrays)
        for key in keys:
            _check_name(key, "array name")
        request, info = _jsonable(dict(request), "request"), _jsonable(dict(info or {}), "info")
        if not overwrite and (existing := self.load(name, request, required=keys)) is not None:
            return existing
        with self.writer(name, request, info, overwrite) as writer:
            for key, value in arrays.items():
                writer.put(key, value)
            return writer.publish()

    def writer(self, name: str, request: Mapping[str, Any], info: Mapping[str, Any] | None = None, overwrite: bool = False) -> "EntryWriter":
        """An :class:`EntryWriter` of entry ``name``: its arrays written one by one, large ones block by block as they
        are computed, then published as :meth:`save` publishes (use it as a context manager: a write left
        unpublished, by an exception or otherwise, is deleted and never reads as an entry)."""
        _check_name(name, "entry name")
        return EntryWriter(self, name, _jsonable(dict(request), "request"), _jsonable(dict(info or {}), "info"), overwrite)

    def retain(self, keep_last: int, prefix: str = "", info: Mapping[str, Any] | None = None) -> list[str]:
        """Delete all but the ``keep_last`` newest complete entries whose names start with ``prefix`` and whose
        ``info`` holds every key and value of ``info`` (e.g. the run that wrote them), newest by the integer
        ``info["epoch"]`` (entries without one are older than any with), then by time written; return the
        deleted names. Writes in progress, damaged entries and entries that do not match are left alone,
        so that runs sharing the folder each keep their own."""
        if not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be a non-negative integer, not {keep_last!r}.")
        if not self.root.is_dir():
            return []
        wanted = _jsonable(dict(info or {}), "info")
        entries = []
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not folder.name.startswith(prefix):
                continue
            try:
                recorded = _read_manifest(folder)["info"]
                if any(recorded.get(key) != value for key, value in wanted.items()):
                    continue
                epoch = recorded.get("epoch")
                written = (folder / MANIFEST).stat().st_mtime
            except (_Damaged, OSError):
                continue
            entries.append((epoch if isinstance(epoch, int) else -1, written, folder.name))
        retired = [name for *_, name in sorted(entries)[: max(len(entries) - keep_last, 0)]]
        for name in retired:
            self._delete(self.path(name))
        self._remove_abandoned()
        return retired

    def delete(self, name: str) -> None:
        """Delete an entry (nothing if there is none)."""
        self._delete(self.path(name))

    def size_bytes(self) -> int:
        """Bytes held by the store's files, hidden folders (writes in progress, damaged entries) included."""
        total = 0
        for folder, _, files in os.walk(self.root):
            for file in files:
                try:
                    total += os.stat(os.path.join(folder, file)).st_size
                except FileNotFoundError:  # deleted meanwhile by another process
                    pass
        return total

    # -- internals ---------------------------------------------------------------------------------
    def _hidden(self, name: str, kind: str) -> Path:
        return self.root / f".{name}.{kind}-{uuid.uuid4().hex}"

    def _publish(self, tmp: Path, name: str, request: Any, keys: tuple[str, ...], overwrite: bool) -> dict[str, Any] | None:
        """Move the written entry ``tmp`` into place. Returns None once it is there, or the arrays of an
        entry for the same request that another writer completed first (kept unless ``overwrite``)."""
        final = self.path(name)
        while True:
            try:
                os.rename(tmp, final)  # atomic, and refused while a complete entry holds the name
                return None
            except OSError as err:
                if err.errno not in _NAME_TAKEN:
                    raise
            if overwrite:
                self._delete(final)
            elif (existing := self.load(name, request, required=keys)) is not None:
                return existing

    def _delete(self, folder: Path) -> None:
        """Delete an entry: first renamed out of the way at once, so no reader sees it half deleted."""
        trash = self._hidden(folder.name, "trash")
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return
        _remove(trash)

    def _set_aside(self, folder: Path, inode: int, reason: str) -> None:
        """Rename a damaged entry to a hidden folder and warn; unless a new entry has taken its place meanwhile."""
        aside = self._hidden(folder.name, "damaged")
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            return  # another process set it aside or deleted it already
        except OSError as err:
            raise StoreError(
                f"The feature store entry {folder} cannot be used: {reason}; and it cannot be moved aside "
                f"({err.strerror or err}). Delete the folder {folder} to compute it again."
            ) from err
        if aside.stat().st_ino != inode:  # another writer replaced the damaged entry since it was read
            try:
                os.rename(aside, folder)
            except OSError:
                pass  # yet another entry is there: this one stays aside, nothing is lost
            return
        warnings.warn(
            f"The feature store entry {folder} cannot be used: {reason}. It was moved to {aside} (delete that folder "
            "once inspected) and its features will be computed again.",
            StoreWarning,
            stacklevel=3,
        )

    def _remove_abandoned(self) -> None:
        """Delete what interrupted writes and deletions left behind, never a live writer's temporary folder."""
        now = time.time()
        for folder in self.root.iterdir():
            hidden = _HIDDEN.fullmatch(folder.name)
            if hidden and (hidden["kind"] == "trash" or (hidden["kind"] == "tmp" and self._abandoned(folder, now))):
                _remove(folder)

    def _abandoned(self, tmp: Path, now: float) -> bool:
        try:
            writer = json.loads((tmp / WRITER).read_text())
            if writer["host"] == socket.gethostname() and not _process_exists(writer["pid"]):
                return True
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not written yet, or unreadable: judged by its age alone
        try:
            last_change = max(path.stat().st_mtime for path in (tmp, *tmp.iterdir()))
        except OSError:  # deleted meanwhile
            return False
        return now - last_change > self.stale_after


class EntryWriter:
    """One store entry written in its hidden temporary folder: whole arrays with :meth:`put`, large ones
    preallocated with :meth:`allocate` as ``.npy`` memory maps and filled block by block with :meth:`write`,
    so that no copy of them is held in memory; :meth:`publish` records their sizes and SHA-256 in the manifest,
    written last, and moves the folder into place atomically. The files are those :meth:`FeatureStore.save`
    writes, bit for bit. Until published, the folder is a write in progress (deleted on :meth:`abort`, at the
    end of a ``with`` block, or once abandoned), so an interrupted writer never leaves an entry that reads as
    complete."""

    def __init__(self, store: FeatureStore, name: str, request: Any, info: Any, overwrite: bool):
        self.store, self.name, self.request, self.info, self.overwrite = store, name, request, info, overwrite
        self.final, self.tmp = store.path(name), store._hidden(name, "tmp")
        self._described: dict[str, dict[str, Any]] = {}
        self._maps: dict[str, np.memmap] = {}
        store.check_writable()
        store._remove_abandoned()
        with self._errors():
            self.tmp.mkdir()
            (self.tmp / WRITER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))

    def __enter__(self) -> "EntryWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.abort()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            raise _write_error(err, self.final) from err

    def _key(self, key: str) -> None:
        _check_name(key, "array name")
        if key in self._described or key in self._maps:
            raise ValueError(f"The array {key!r} is written already: give each array of an entry once.")

    def put(self, key: str, value: Any) -> None:
        """Write a whole array (a tensor or an array-like) at once."""
        self._key(key)
        array, dtype = _as_array(key, value)
        with self._errors():
            self._described[key] = {"shape": list(array.shape), **dtype, **_write_npy(self.tmp / f"{key}.npy", array)}

    def allocate(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Preallocate the array ``key`` on disk (zeros), to be filled by :meth:`write`."""
        self._key(key)
        self._open(key, tuple(shape), dtype)

    def _open(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        _, meta = _as_array(key, torch.empty(0, dtype=dtype))
        with self._errors():
            self._maps[key] = np.lib.format.open_memmap(self.tmp / f"{key}.npy", mode="w+", dtype=meta.get("bits", meta["dtype"]), shape=shape)
        self._described[key] = {"shape": list(shape), **meta}

    def dtype(self, key: str) -> torch.dtype:
        """The dtype the allocated array ``key`` holds now."""
        return getattr(torch, self._described[key]["dtype"])

    def write(self, key: str, start: int, values: torch.Tensor) -> None:
        """Write ``values`` into rows ``start:start + len(values)`` of the allocated array ``key``. Values of a
        wider dtype than the array's (features beyond float16's range) first widen the whole array on disk."""
        if key not in self._maps:
            raise ValueError(f"The array {key!r} was not allocated: call allocate({key!r}, shape, dtype) first.")
        if values.dtype != self.dtype(key):
            self._widen(key, values.dtype)
        bits, _ = _as_array(key, values)
        with self._errors():
            self._maps[key][start : start + len(bits)] = bits

    def _widen(self, key: str, dtype: torch.dtype, block: int = 4096) -> None:
        """Rewrite the allocated array ``key`` in ``dtype``, block by block."""
        old, old_dtype = self._maps.pop(key), self.dtype(key)
        del self._described[key]
        path = self.tmp / f"{key}.npy"
        narrow = self.tmp / f"{key}.narrow"
        with self._errors():
            old.flush()
            os.rename(path, narrow)
        self._open(key, old.shape, dtype)
        for start in range(0, len(old), block):
            rows = torch.from_numpy(np.ascontiguousarray(old[start : start + block])).view(old_dtype)
            self._maps[key][start : start + len(rows)] = _as_array(key, rows.to(dtype))[0]
        del old
        narrow.unlink()

    def publish(self) -> dict[str, Any]:
        """Record the arrays in the manifest and move the entry into place; return its arrays as memory maps (or
        those of an entry for the same request that another writer completed first, kept unless ``overwrite``)."""
        store, keys = self.store, tuple(self._described)
        try:
            for key, array in self._maps.items():
                array.flush()
                path = self.tmp / f"{key}.npy"
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                self._described[key].update(bytes=path.stat().st_size, sha256=_file_sha256(path))
            self._maps.clear()
            manifest = {"format": FORMAT, "request": self.request, "arrays": self._described, "info": self.info}
            with open(self.tmp / MANIFEST, "w") as f:  # written last: a folder without it is incomplete
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            existing = store._publish(self.tmp, self.name, self.request, keys, self.overwrite)
            _fsync_dir(store.root)
        except OSError as err:
            raise _write_error(err, self.final) from err
        finally:
            self.abort()  # gone already once moved into place
        return existing if existing is not None else _open_arrays(self.final, manifest, verify=False)

    def abort(self) -> None:
        """Delete the write in progress (nothing once published)."""
        self._maps.clear()
        _remove(self.tmp)
