"""The run's meta file (``monitor_logs/{run_id}_meta.json``) and its segments.

:class:`RunMeta` holds what meta says (run id, configuration, versions, world, the
participation decision, what each part attached, the end) and rewrites the file
atomically on the writing rank at every change. A run folder written again (a resume)
keeps the earlier ``segments`` and appends one per process lifetime::

    {"start_time": ..., "pid": ..., "first_step": 100, "end_time": ..., "status": ...}
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from monitor._log import warn_or_log


class _JsonFiles(Protocol):
    def path(self, relative: str) -> Path: ...

    def read_json(self, relative: str) -> dict | None: ...

    def write_json(self, relative: str, obj: dict) -> object: ...

    @property
    def health(self) -> Any: ...


class RunMeta:
    """The content of meta, written through ``files`` at every change.

    Args:
        files: the session's run files (do nothing on a rank that does not write).
        relative: meta's path in the run folder.
        fields: the fields of this process's start; ``segments`` and ``resumed`` are
            taken from the meta already on disk, if any.
        start_time: this segment's start.
        records_exist: the run folder already holds records of this run (its streams).

    A run is resumed when meta is on disk *or* the streams hold records: whatever state
    meta is in, a folder with records is never taken for a new run (which would append
    after them with no resume marker, so that a reader would count steps twice). Meta
    missing, unreadable or of the wrong shape is then warned about once and rebuilt: the
    earlier segments it held are kept where they are readable, else stand as one segment
    ``{"status": "unknown", "rebuilt": true}``. ``segments`` is the only field read back,
    and it is type-checked (a list of objects).
    """

    def __init__(self, files: _JsonFiles, relative: str, fields: Mapping[str, Any], *,
                 start_time: float, records_exist: bool = False) -> None:
        self._files, self.path = files, relative
        self._pid = os.getpid()
        segments, problem = _earlier_segments(files, relative)
        resumed = problem is None or records_exist
        if problem is not None and (resumed or problem != "missing"):
            rebuilt = [s for s in segments or [] if isinstance(s, dict)]
            if resumed and not rebuilt:
                rebuilt = [dict(REBUILT_SEGMENT)]
            warn_or_log(
                f"monitor: {files.path(relative)}: meta is {problem}"
                + ("; the folder already holds this run's records, so this run resumes "
                   "them: meta is rebuilt (unreadable earlier segments stand as one of "
                   "status 'unknown'), and each stream gets the usual resume marker"
                   if resumed else "; it is replaced"), stacklevel=4)
            segments = rebuilt
        segments = list(segments or [])
        segments.append({"start_time": start_time, "pid": os.getpid(), "first_step": None})
        self.data: dict[str, Any] = {**fields, "resumed": resumed, "segments": segments}
        self.write()

    # -- reading ------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __len__(self) -> int:
        return len(self.data)

    @property
    def resumed(self) -> bool:
        return bool(self.data["resumed"])

    @property
    def segment(self) -> dict:
        """This process's segment."""
        return self.data["segments"][-1]

    @property
    def segment_number(self) -> int:
        return len(self.data["segments"])

    # -- writing ------------------------------------------------------------------------

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.write()

    def set_part(self, name: str, info: dict) -> None:
        """What part ``name`` attached (meta's ``parts``)."""
        parts = dict(self.data.get("parts", {}))
        parts[name] = info
        self.update(parts=parts)

    def write(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked child never writes its parent's run
        health = self._files.health
        health.meta_stale = False  # what is written now shows every failure so far
        self.data.update(health.as_meta())
        self._files.write_json(self.path, self.data)


REBUILT_SEGMENT = {"start_time": None, "pid": None, "first_step": None, "status": "unknown",
                   "rebuilt": True}
"""What stands for the earlier segments of a resumed run whose meta could not be read."""


def _earlier_segments(files: _JsonFiles, relative: str) -> tuple[list | None, str | None]:
    """``(segments, problem)`` of the meta on disk: ``(list, None)`` when it is readable,
    ``(None, "missing")``, or the segments that can be kept and what is wrong."""
    if not getattr(files, "is_writer", True):
        return None, "missing"  # a rank that does not write never looks at the disk
    previous = files.read_json(relative)
    if previous is None:
        path = files.path(relative)
        return None, "unreadable (not a JSON object)" if path.exists() else "missing"
    segments = previous.get("segments", [])
    if not isinstance(segments, list):
        return [], f"of the wrong shape ('segments' is a {type(segments).__name__})"
    if not all(isinstance(s, dict) for s in segments):
        return segments, "of the wrong shape (an entry of 'segments' is not an object)"
    return segments, None


def plain_config(config: object) -> dict | None:
    """A JSON-able copy of a config mapping or dataclass (unknown values as their repr)."""
    if config is None:
        return None
    if hasattr(config, "__dataclass_fields__"):
        config = {f: getattr(config, f) for f in config.__dataclass_fields__}
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping or a dataclass, got {type(config).__name__}")
    return {str(k): _jsonable(v) for k, v in config.items()}


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
