"""The run a monitor belongs to: who writes, who takes part, the reducer and the meta file.

One :class:`MonitorSession` per run folder and process. ``Monitor`` (training metrics) builds
its own; the CogVLA facade shares one between the training monitor and its observers so
that everything due at a step goes through one fused reduction (``session.scheduler``, see
:mod:`monitor.streams`).
"""

from __future__ import annotations

import atexit
import math
import os
import platform
import socket
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
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
    if "\0" in run_id:
        raise ValueError(f"run_id must not contain a NUL character, got {run_id!r}")
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

    Raises:
        RunDirLockedError: another live process writes ``run_dir`` (rank 0 only).

    Reliability (see "Guarantees" in ``monitor/README.md``): rank 0 holds the run folder's
    lock while the session lives; write failures degrade the session instead of raising;
    when the process exits without the session being finished (an uncaught exception, a
    script that never calls ``finalize()``), an exit handler writes the summaries and meta
    with ``status`` ``"failed"`` (and the error's type) or ``"incomplete"``, without any
    collective. A resumed run (the same folder and run id again) appends to the same files
    and, at its first flush, marks the dead segment's records at or after its first step as
    superseded.
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
        self.files = RunFiles(self.run_dir, run_id) if self.world.is_writer \
            else NullRunFiles(self.run_dir)
        # a session dropped unfinished frees the lock (at exit the OS does, after the guard)
        weakref.finalize(self, self.files.close).atexit = False
        self.start_time = time.time()
        self._stream_files: list[tuple[str, Callable[[list[dict]], None]]] = []
        self._segment_started = False
        self._finishers: list[Callable[[str, str | None], None]] = []
        self.closed = False
        self._exit_guard = _ExitGuard(weakref.ref(self))
        atexit.register(self._exit_guard)
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
        self._write_meta()

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def first_step(self) -> int | None:
        """The first step this session saw (None before any): a resumed run's resume step."""
        return self.scheduler.first_step

    @property
    def resumed(self) -> bool:
        return bool(self.meta["resumed"])

    @property
    def degraded(self) -> bool:
        """True once a write on this rank failed (see :class:`monitor.sinks.WriteHealth`)."""
        return self.files.health.degraded

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
        if not self._segment_started:
            self.start_segment()
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
        self._write_meta()

    def _write_meta(self) -> None:
        self.meta.update(self.files.health.as_meta())
        self.files.write_json(self.meta_path, self.meta)

    def _record_participation(self) -> None:
        if self.meta["participation"]["decision"] != self.participation.decision:
            self.meta["participation"] = self._participation_meta()
            self._write_meta()

    # -- segments (resume) ----------------------------------------------------------------

    def register_stream_file(self, relative: str,
                             on_resume: Callable[[list[dict]], None]) -> None:
        """A JSONL stream of this session; on resume, ``on_resume(kept records)`` seeds
        its owner's summary with the earlier segments' records that are not superseded."""
        self._stream_files.append((relative, on_resume))

    def start_segment(self) -> None:
        """Once, at the first flush (or the end, if none): note the first step in meta and,
        on a resumed run (writing rank), mark each stream's overlap as superseded.

        Host-side file work on rank 0 only; no collective.
        """
        if self._segment_started:
            return
        self._segment_started = True
        first = self.first_step
        self.meta["segments"][-1]["first_step"] = first
        if self.resumed and self.files.is_writer:
            number = len(self.meta["segments"])
            for relative, on_resume in self._stream_files:
                lines = self.files.read_jsonl(relative)
                live = records.live_records(lines)
                kept = live if first is None else [r for r in live if _before(r, first)]
                if lines and first is not None:
                    marker = records.resume_marker(first, self.world_size, number,
                                                   len(live) - len(kept))
                    self.files.jsonl(relative).write(marker)
                on_resume(kept)
        self._write_meta()

    # -- the end --------------------------------------------------------------------------

    def on_exit(self, finisher: Callable[[str, str | None], None]) -> None:
        """``finisher(status, error)`` is called by the exit handler if the session was not
        finished (it must not communicate; ``status`` is ``"failed"`` or ``"incomplete"``)."""
        self._finishers.append(finisher)

    def finish(self, status: str, error: str | None = None) -> None:
        """Write the end into meta (status, error, end time) and release the run folder."""
        if self.closed:
            return
        self.start_segment()
        end = time.time()
        self.meta["segments"][-1].update(end_time=end, status=status)
        self.update_meta(end_time=end, status=status, error=error)
        self.close()

    def close(self) -> None:
        """Release the lock and the exit handler (no file is written)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self._exit_guard)
        self.files.close()

    def abandon(self) -> None:
        """The exit handler: finish every part that was never finished, without a
        collective (other ranks may be gone)."""
        if self.closed:
            return
        error_type = getattr(sys, "last_type", None)
        status = "incomplete" if error_type is None else "failed"
        error = None if error_type is None else error_type.__name__
        try:
            for finisher in list(self._finishers):
                finisher(status, error)
        finally:
            self.finish(status, error)

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
        segments.append({"start_time": self.start_time, "pid": os.getpid(), "first_step": None})
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


class _ExitGuard:
    """What ``atexit`` holds: a weak reference, so an unused session can be collected."""

    def __init__(self, session: weakref.ref) -> None:
        self._session = session

    def __call__(self) -> None:
        session = self._session()
        if session is not None:
            session.abandon()


def _before(rec: dict, first: int) -> bool:
    step = rec.get("step")
    return not isinstance(step, int) or step < first


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
