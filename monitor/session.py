"""The run a monitor belongs to: who writes, who takes part, the reducer and the meta file.

One :class:`MonitorSession` per run folder and process. ``Monitor`` (training metrics) builds
its own; the CogVLA facade shares one between the training monitor and its observers so
that everything due at a step goes through one fused reduction (``session.scheduler``, see
:mod:`monitor.streams`).
"""

from __future__ import annotations

import math
import os
import platform
import socket
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from monitor import distributed, records
from monitor._version import __version__
from monitor.sinks import NullRunFiles, RunFiles
from monitor.streams import FlushScheduler


def validate_run_id(run_id: object) -> str:
    """A run id is a single, non-empty path component."""
    if not isinstance(run_id, str) or not run_id.strip():
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
    if "/" in run_id or "\\" in run_id or os.sep in run_id or ".." in run_id or run_id == ".":
        raise ValueError(f"run_id must not contain a path separator or '..', got {run_id!r}")
    return run_id


class MonitorSession:
    """Shared state of one monitored run in this process.

    Args:
        run_dir: the run's own folder (``runs/{run_id}``); created on rank 0.
        run_id: names the files; a single path component.
        config_name: free text written to meta (e.g. the dataset name).
        config: a mapping (or dataclass) written to meta as the monitor's configuration.
        participation: ``"auto"`` (detect whether every rank built a monitor through the
            default group's store, with a bounded wait at the first flush), ``"all"`` or
            ``"local"``.
        participation_timeout: seconds of that wait (default 10, or
            ``$MONITOR_PARTICIPATION_TIMEOUT``).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        run_id: str,
        *,
        config_name: str | None = None,
        config: Mapping | None = None,
        participation: str = "auto",
        participation_timeout: float | None = None,
    ) -> None:
        if not isinstance(run_dir, (str, os.PathLike)):
            raise TypeError(f"run_dir must be a str or os.PathLike, got {type(run_dir).__name__}")
        self.run_id = validate_run_id(run_id)
        self.run_dir = Path(run_dir)
        self.world = distributed.detect_world()
        timeout = distributed.participation_timeout(participation_timeout)
        self.participation = distributed.Participation(self.world, run_id, participation, timeout)
        self.files = RunFiles(self.run_dir) if self.world.is_writer else NullRunFiles(self.run_dir)
        self.start_time = time.time()
        self._reducer: distributed.Reducer | None = None
        self.scheduler = FlushScheduler(self.reduce, lambda: self.device)
        if self.participation.decision == distributed.NO_PROCESS_GROUP:
            warnings.warn(
                f"monitor: RANK={self.world.rank} of WORLD_SIZE={self.world.world_size} but no "
                "process group is initialised: statistics are this process's own and only "
                "RANK 0 writes files (build the monitor after init_process_group for global "
                "statistics)",
                RuntimeWarning,
                stacklevel=3,
            )
        self._listeners: list[Listener] = []
        self._closed_listeners = False
        self.meta_path = f"monitor_logs/{run_id}_meta.json"
        self.meta = self._initial_meta(config_name, config)
        self.files.write_json(self.meta_path, self.meta)

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def first_step(self) -> int | None:
        """The first step of this process's segment of the run (None before any step)."""
        return self.scheduler.first_step

    # -- listeners: integrations fed with the records rank 0 writes ------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener.publish(part, kind, record)`` after each record rank 0 writes,
        and ``listener.close()`` when the run is finalized (see ``monitor.integrations``).

        ``part`` is ``"train"`` or an observer's part (``"lfp"``, ...); ``kind`` is the
        mode for training records, else ``"events"``, ``"detailed"`` or ``"alert"``.
        Records are the plain dicts of the JSONL files, already reduced: a listener adds no
        collective and no host sync. Only the writing rank keeps listeners (elsewhere this
        does nothing). A listener that raises is warned about once and dropped.
        """
        if not (callable(getattr(listener, "publish", None))
                and callable(getattr(listener, "close", None))):
            raise TypeError("a listener needs publish(part, kind, record) and close() methods, "
                            f"got {type(listener).__name__}")
        if self.world.is_writer and not self._closed_listeners:
            self._listeners.append(listener)

    @property
    def listeners(self) -> list[Listener]:
        return list(self._listeners)

    def publish(self, part: str, kind: str, record: dict) -> None:
        """Hand a record that was just written to every listener (rank 0 only)."""
        for listener in list(self._listeners):
            try:
                listener.publish(part, kind, record)
            except Exception as exc:  # noqa: BLE001 - an integration must not kill training
                self._drop_listener(listener, "publish", exc)

    def close_listeners(self) -> None:
        """Close every listener (at finalize). Idempotent."""
        self._closed_listeners = True
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            try:
                listener.close()
            except Exception as exc:  # noqa: BLE001 - finalize must complete
                self._drop_listener(listener, "close", exc)

    def _drop_listener(self, listener: Listener, what: str, exc: Exception) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
        warnings.warn(f"monitor: {type(listener).__name__}.{what} failed "
                      f"({type(exc).__name__}: {exc}); that integration is turned off, "
                      "training and the JSONL logs go on", RuntimeWarning, stacklevel=4)

    @property
    def device(self) -> torch.device:
        """Where flush buffers are packed."""
        return distributed.reduction_device()

    def reducer(self) -> distributed.Reducer | None:
        """The reducer once participation is decided; None where this rank's values go nowhere."""
        if self._reducer is None:
            decision = self.participation.decide()
            self._record_participation()
            collective = decision == distributed.ALL_RANKS
            if not collective and not self.world.is_writer:
                return None
            self._reducer = distributed.Reducer(collective, self.device)
        return self._reducer

    def reduce(self, layout: dict[str, list[str]], rows: torch.Tensor, step: int, mode: str):
        """Reduce packed rows; returns ``{group: (names, reduced CPU rows)}`` or None."""
        reducer = self.reducer()
        if reducer is None:
            return None
        union, reduced = reducer.reduce(layout, rows, step, mode)
        out, start = {}, 0
        for group, names in union.items():
            out[group] = (names, reduced[start : start + len(names)])
            start += len(names)
        return out

    def update_meta(self, **fields) -> None:
        self.meta.update(fields)
        self.files.write_json(self.meta_path, self.meta)

    def _record_participation(self) -> None:
        if self.meta["participation"]["decision"] != self.participation.decision:
            self.meta["participation"] = self._participation_meta()
            self.files.write_json(self.meta_path, self.meta)

    def _participation_meta(self) -> dict:
        decision = self.participation.decision
        part = {"requested": self.participation.mode, "decision": decision,
                "reason": self.participation.reason}
        if decision is None:
            part.update(decision="pending", statistics="pending (decided at the first flush)")
        elif decision in (distributed.ALL_RANKS, distributed.SINGLE_PROCESS):
            part.update(statistics="global", contributing_ranks=list(range(self.world_size)))
        else:
            part.update(statistics="local", contributing_ranks=[0])
        return part

    def _initial_meta(self, config_name, config) -> dict:
        previous = self.files.read_json(self.meta_path)
        segments = list(previous.get("segments", [])) if previous else []
        segments.append({"start_time": self.start_time, "pid": os.getpid()})
        return {
            "run_id": self.run_id,
            "config_name": config_name,
            "config": _plain(config),
            "versions": {"monitor": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "world_size": self.world.world_size,
            "backend": self.world.backend,
            "participation": self._participation_meta(),
            "host": socket.gethostname(),
            "start_time": self.start_time,
            "schema_version": records.SCHEMA_VERSION,
            "resumed": previous is not None,
            "segments": segments,
        }


class Listener:
    """What ``MonitorSession.add_listener`` takes (any object with these two methods)."""

    def publish(self, part: str, kind: str, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _plain(config) -> dict | None:
    """A JSON-able copy of a config mapping or dataclass (unknown values as their repr)."""
    if config is None:
        return None
    if hasattr(config, "__dataclass_fields__"):
        config = {f: getattr(config, f) for f in config.__dataclass_fields__}
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping or a dataclass, got {type(config).__name__}")
    return {str(k): _jsonable(v) for k, v in config.items()}


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
