"""Feature store: named folders of ``.npy`` arrays with a ``manifest.json`` that says what they hold.

Featurizing is the expensive stage, so its results are kept on disk and read back as memory maps
(``kernel_blocks`` streams kernel rows from them). An entry is written into a hidden temporary folder
and moved into place with one ``os.replace`` after its manifest, so an interrupted write never leaves an
entry that reads back as complete. A manifest records the *request* the arrays answer (kernel, K,
projector, seed, parameter fingerprint, data fingerprints, dtype, library version); an entry is reused
only for the same request and refused, with the differences spelled out, for any other.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

MANIFEST = "manifest.json"
FORMAT = 1
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class StoreError(RuntimeError):
    """The feature store cannot be written or read as asked."""


class StoreMismatchError(StoreError):
    """A stored entry answers a different request than the current one."""


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so that requests compare equal."""
    return json.loads(json.dumps(value))


def _differences(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(stored) | set(wanted), key=str):
            out += _differences(stored.get(key), wanted.get(key), f"{prefix}{key}.")
        return out
    return [] if stored == wanted else [f"{prefix.rstrip('.')}: stored {stored!r}, requested {wanted!r}"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through ordinary file writes, so that a full disk raises ``OSError`` with its errno
    (``ndarray.tofile`` reports a short write without one), then flushed to the disk."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(memoryview(array.reshape(-1)).cast("B") if array.size else b"")
        f.flush()
        os.fsync(f.fileno())


class FeatureStore:
    """A folder of entries ``root/<name>/{<array>.npy, manifest.json}``.

    Only one process may write a given entry at a time (under DDP, rank 0 writes).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

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
                f"The feature store folder {self.root} is not writable ({err.strerror or err}). "
                "Pass store_dir= a folder this process can write to."
            ) from err

    def manifest(self, name: str) -> dict | None:
        """The manifest of a complete entry, or None when there is none."""
        path = self.path(name) / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise StoreError(f"The manifest {path} cannot be read ({err}); delete the folder {path.parent} to recompute it.") from err

    def load(self, name: str, request: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
        """The arrays of entry ``name`` as memory maps if it answers ``request``; None if the
        entry does not exist (or was never completed). Raises :class:`StoreMismatchError` if it answers
        another request."""
        manifest = self.manifest(name)
        if manifest is None:
            return None
        diffs = _differences(manifest.get("request"), _jsonable(dict(request)))
        if diffs:
            raise StoreMismatchError(
                f"The feature store entry {self.path(name)} holds features for a different request: "
                + "; ".join(diffs)
                + ". Delete that folder, choose another store_dir, or allow overwriting it (overwrite_store=True)."
            )
        arrays = {}
        for key, meta in manifest["arrays"].items():
            path = self.path(name) / f"{key}.npy"
            try:
                array = np.load(path, mmap_mode="c")  # copy-on-write: writable in memory, never on disk
            except (OSError, ValueError) as err:
                raise StoreError(f"The stored array {path} cannot be read ({err}); delete {path.parent} to recompute it.") from err
            if list(array.shape) != meta["shape"] or str(array.dtype) != meta["dtype"]:
                raise StoreError(
                    f"The stored array {path} has shape {array.shape} and dtype {array.dtype}, but its manifest says "
                    f"{meta['shape']} and {meta['dtype']}; delete {path.parent} to recompute it."
                )
            arrays[key] = array
        return arrays

    def save(
        self,
        name: str,
        request: Mapping[str, Any],
        arrays: Mapping[str, Any],
        info: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> dict[str, np.ndarray]:
        """Write ``arrays`` (tensors or array-likes) as entry ``name`` atomically and return them read
        back as memory maps. An existing entry is refused unless ``overwrite``."""
        final = self.path(name)
        if final.exists() and not overwrite:
            raise StoreError(f"The feature store entry {final} exists already; load it, or pass overwrite=True.")
        self.check_writable()
        for stale in self.root.glob(f".{name}.tmp-*"):  # left behind by an interrupted write
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".{name}.tmp-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            described = {}
            for key, value in arrays.items():
                array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
                _write_npy(tmp / f"{key}.npy", array)
                described[key] = {"shape": list(array.shape), "dtype": str(array.dtype)}
            manifest = {"format": FORMAT, "request": _jsonable(dict(request)), "arrays": described, "info": _jsonable(dict(info or {}))}
            with open(tmp / MANIFEST, "w") as f:  # written last: an entry without it is incomplete
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                old = self.root / f".{name}.tmp-{uuid.uuid4().hex}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno in _DISK_FULL:
                raise StoreError(
                    f"The disk is full: writing features to {final} failed ({err.strerror}). Free space there, "
                    "point store_dir= to a larger disk, or store less (fewer max_train_examples/max_query_examples, "
                    "a smaller projection_dim)."
                ) from err
            raise StoreError(f"Writing features to {final} failed ({err}); pass store_dir= a writable folder.") from err
        return self.load(name, request)
