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
from typing import Any, Protocol


class _JsonFiles(Protocol):
    def read_json(self, relative: str) -> dict | None: ...

    def write_json(self, relative: str, obj: dict) -> None: ...

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
    """

    def __init__(self, files: _JsonFiles, relative: str, fields: Mapping[str, Any], *,
                 start_time: float) -> None:
        self._files, self.path = files, relative
        previous = files.read_json(relative)
        segments = list(previous.get("segments", [])) if previous else []
        segments.append({"start_time": start_time, "pid": os.getpid(), "first_step": None})
        self.data: dict[str, Any] = {**fields, "resumed": previous is not None,
                                     "segments": segments}
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
        self.data.update(self._files.health.as_meta())
        self._files.write_json(self.path, self.data)


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
