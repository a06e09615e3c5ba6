"""Read back what a W&B run wrote offline, without a network or a W&B account.

An offline run writes one binary ``run-<id>.wandb`` log: a LevelDB-style log (32 KiB blocks of
checksummed fragments) of ``wandb_internal_pb2.Record`` protobufs. This module decodes it, so that
tests can assert on the history rows, metric definitions and media files a run really recorded.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from wandb.proto import wandb_internal_pb2

FILE_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version 0
RECORD_HEADER = struct.Struct("<IHB")  # crc32 of (type byte + data), data length, fragment type
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a ``.wandb`` log, in order; a fragment with a bad checksum raises."""
    data = Path(path).read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path} is not a W&B run log (header {ident!r}, {magic:#x}, {version}).")
    records, pending, pos = [], b"", FILE_HEADER.size
    while pos + RECORD_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < RECORD_HEADER.size:  # the rest of a block too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        checksum, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if length == 0 and kind == 0:  # zero padding at the end of a block or of the file
            pos += BLOCK - pos % BLOCK
            continue
        payload = data[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"Corrupt fragment at byte {pos} of {path}.")
        pos += RECORD_HEADER.size + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _items(items, out: dict | None = None) -> dict:
    """History/config items as a dict (merged into ``out``); nested keys (a table's ``path``,
    ``nrows``...) become nested dicts."""
    out = {} if out is None else out
    for item in items:
        keys = list(item.nested_key) or [item.key]
        target = out
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = json.loads(item.value_json)
    return out


@dataclass
class OfflineRun:
    """The decoded content of one offline run folder (``.../wandb/offline-run-*``)."""

    path: Path
    history: list[dict] = field(default_factory=list)  # one dict per logged step
    metrics: list[dict] = field(default_factory=list)  # define_metric records
    config: dict = field(default_factory=dict)
    exit_code: int | None = None

    def rows(self, key: str) -> list[dict]:
        """The history rows that hold ``key``."""
        return [row for row in self.history if key in row]

    def media(self, relative_path: str) -> dict:
        """A media file of the run (e.g. a table's JSON) by the path stored in a history row."""
        return json.loads((self.path / "files" / relative_path).read_text())


def read_run(run_dir: str | Path, timeout: float = 30.0) -> OfflineRun:
    """Decode the single ``run-*.wandb`` log of an offline run folder, once W&B's writer has finished it:
    ``finish()`` can return while its service process is still writing the last records, so the log is
    read again until it holds the run's exit record (or ``timeout`` seconds have passed)."""
    run_dir = Path(run_dir)
    deadline = time.monotonic() + timeout
    while True:
        try:
            run = _decode(run_dir)
        except ValueError:  # a record half written
            if time.monotonic() > deadline:
                raise
        else:
            if run.exit_code is not None or time.monotonic() > deadline:
                return run
        time.sleep(0.2)


def _decode(run_dir: Path) -> OfflineRun:
    logs = sorted(run_dir.glob("run-*.wandb"))
    if len(logs) != 1:
        raise FileNotFoundError(f"Expected one run-*.wandb log in {run_dir}, found {len(logs)}.")
    run = OfflineRun(run_dir)
    for record in read_records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "metric":
            run.metrics.append(MessageToDict(record.metric, preserving_proto_field_name=True))
        elif kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            _items(items, run.config)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def find_runs(wandb_dir: str | Path) -> list[Path]:
    """The offline run folders under a ``WANDB_DIR`` (oldest first)."""
    return sorted(Path(wandb_dir).glob("**/offline-run-*"))
