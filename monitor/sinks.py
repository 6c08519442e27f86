"""The only module that touches the filesystem, used on the writing rank (rank 0) only.

Ranks that do not write get :class:`NullRunFiles`, decided once at construction, so call
sites never branch on rank.

Files (paths relative to the run folder ``runs/{run_id}``)::

    monitor_logs/{run_id}.jsonl          one JSON object per line, appended, flushed per line
    monitor_logs/{run_id}_summary.json   replaced atomically (write to a temp file, rename)
    monitor_logs/{run_id}_meta.json      replaced atomically

Sample JSONL line::

    {"step": 100, "mode": "train", "time": 1764081600.12, "world_size": 2, "metrics":
     {"loss": {"mean": 0.71, "std": 0.05, "min": 0.62, "max": 0.80, "count": 202,
     "nonfinite": 0}}}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def dumps(obj: Any) -> str:
    """Strict JSON (NaN/Inf are a bug upstream: records carry null instead)."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":"))


class JsonlSink:
    """Append-only JSON-lines file: each record is one ``write`` of one whole line, flushed.

    The file is opened for each record and closed after it (records come once per flush,
    so this costs nothing and leaves no handle behind when a run is never finalized).
    Reopening a file whose last line was cut short (a process killed mid-write) first
    truncates that partial line, so every line in the file always parses.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size > 0:
            _truncate_partial_last_line(path)
        else:
            path.touch()

    def write(self, record: dict) -> None:
        line = dumps(record) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


class NullSink:
    """What non-writing ranks hold: accepts records, writes nothing."""

    def write(self, record: dict) -> None:
        pass


def _truncate_partial_last_line(path: Path) -> None:
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(4096, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(pos - step + cut + 1)
                return
            pos -= step
        f.truncate(0)


class RunFiles:
    """The run folder on the writing rank: opens streams, reads and replaces JSON files.

    Raises:
        ValueError: ``run_dir`` exists and is not a directory.
    """

    is_writer = True

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.root = Path(run_dir)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"run_dir must be a directory, but {str(self.root)!r} is a file")
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def jsonl(self, relative: str) -> JsonlSink:
        return JsonlSink(self.path(relative))

    def read_json(self, relative: str) -> dict | None:
        """A JSON file's content, or None when missing or unreadable (never raises)."""
        try:
            with open(self.path(relative), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_json(self, relative: str, obj: dict, *, pretty: bool = True,
                   durable: bool = True) -> None:
        """Replace a JSON file atomically: readers see the old or the new file, never half.

        Args:
            pretty: indent for people (Python's encoder: slow for thousands of metrics).
            durable: ``fsync`` before the rename, so the new file survives a machine crash
                (a process crash never leaves half a file either way).
        """
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(obj, allow_nan=False, indent=2) if pretty else dumps(obj)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text + "\n")
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


class NullRunFiles:
    """The run folder as seen by a rank that never writes."""

    is_writer = False

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.root = Path(run_dir)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def jsonl(self, relative: str) -> NullSink:
        return NullSink()

    def read_json(self, relative: str) -> dict | None:
        return None

    def write_json(self, relative: str, obj: dict, *, pretty: bool = True,
                   durable: bool = True) -> None:
        pass
