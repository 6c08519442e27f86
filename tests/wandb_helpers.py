"""W&B offline runs read back from their ``.wandb`` file (no network, no home dir)."""

from __future__ import annotations

import json
import struct
import time


def wandb_records(data: bytes):
    """The ``Record`` protobufs of a ``.wandb`` file's bytes (W&B's leveldb-style log:
    7-byte file header, 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL or LAST chunk ends a record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_history(run_file, timeout=60.0):
    """The history rows of an offline run's ``.wandb`` file, once W&B wrote its exit
    record: W&B's service writes the file after ``finish()`` returns (seen: 1 run in 15
    still held only the header). Waits at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(run_file.read_bytes()))
        if records and records[-1].WhichOneof("record_type") == "exit":
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{run_file}: no exit record after {timeout:g} s")
        time.sleep(0.1)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode, its files and config under tmp_path: no network, no home dir."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                       "WANDB_DISABLE_GIT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
