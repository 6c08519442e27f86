"""The run a monitor belongs to: who writes, who takes part, the steps, the reduction, the end.

One :class:`MonitorSession` per run folder and process. ``Monitor`` (training metrics) builds
its own; the CogVLA facade shares one between the training monitor and its observers so
that everything due at a step goes through one fused reduction (``session.scheduler``, see
:mod:`monitor.streams`). What the session delegates: paths to :class:`~monitor.layout.RunLayout`,
files to :mod:`monitor.sinks`, meta and its segments to :class:`~monitor.meta.RunMeta`, the
listeners to :class:`~monitor.integrations.fanout.Listeners`, collectives to
:mod:`monitor.distributed`.
"""

from __future__ import annotations

import atexit
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
from monitor.integrations.fanout import Listener, Listeners
from monitor.layout import RunLayout, validate_run_id
from monitor.meta import RunMeta, plain_config
from monitor.schedule import check_step
from monitor.sinks import NullRunFiles, RunFiles
from monitor.streams import FlushScheduler

__all__ = ["MonitorSession", "validate_run_id"]


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
        self.layout = RunLayout(run_id)
        self.run_id = self.layout.run_id
        self.run_dir = Path(run_dir)
        self.world = distributed.detect_world()
        timeout = distributed.participation_timeout(participation_timeout)
        self.participation = distributed.Participation(self.world, run_id, participation, timeout)
        self.files = RunFiles(self.run_dir, run_id) if self.world.is_writer \
            else NullRunFiles(self.run_dir)
        # a session dropped unfinished frees the lock (at exit the OS does, after the guard)
        weakref.finalize(self, self.files.close).atexit = False  # type: ignore[misc]
        self.start_time = time.time()
        self._stream_files: list[tuple[str, Callable[[list[dict]], None]]] = []
        self._segment_started = False
        self._finishers: list[Callable[[str, str | None], object]] = []
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
        self._listeners = Listeners(self.world.is_writer)
        self.meta_path = self.layout.meta
        self.meta = RunMeta(self.files, self.meta_path, {
            "run_id": self.run_id,
            "config_name": config_name,
            "config": plain_config(config),
            "versions": {"monitor": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "world_size": self.world.world_size,
            "backend": self.world.backend,
            "participation": self._participation_meta(),
            "host": socket.gethostname(),
            "start_time": self.start_time,
            "schema_version": records.SCHEMA_VERSION,
        }, start_time=self.start_time)

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def first_step(self) -> int | None:
        """The first step this session saw (None before any): a resumed run's resume step."""
        return self.scheduler.first_step

    @property
    def resumed(self) -> bool:
        return self.meta.resumed

    @property
    def degraded(self) -> bool:
        """True once a write on this rank failed (see :class:`monitor.sinks.WriteHealth`)."""
        return self.files.health.degraded

    # -- listeners: integrations fed with the records rank 0 writes ------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener.publish(part, stream, record)`` after each record rank 0 writes,
        and ``listener.close()`` when the run ends (see :mod:`monitor.integrations.fanout`
        for the arguments). A listener adds no collective and no host sync; only the
        writing rank keeps listeners (elsewhere this does nothing). One that raises is
        warned about once and dropped.
        """
        self._listeners.add(listener)

    @property
    def listeners(self) -> list[Listener]:
        return list(self._listeners)

    def publish(self, part: str, stream: str, record: dict) -> None:
        """Hand a record that was just written to every listener (rank 0 only)."""
        self._listeners.publish(part, stream, record)

    # -- steps and flushes ------------------------------------------------------------------

    def log_step(self, step: int) -> None:
        """The run is at ``step``: flush what an earlier step made due (every part of the
        session together), then mark what ``step`` makes due."""
        self.scheduler.advance(check_step(step))

    def flush_all(self) -> None:
        """Reduce and write whatever every stream of the session holds, in one fused flush
        (a collective: call it on every rank)."""
        self.scheduler.flush(list(self.scheduler.streams))

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

    def _record_participation(self) -> None:
        if self.meta["participation"]["decision"] != self.participation.decision:
            self.meta.update(participation=self._participation_meta())

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
        self.meta.segment["first_step"] = first
        if self.resumed and self.files.is_writer:
            number = self.meta.segment_number
            for relative, on_resume in self._stream_files:
                lines = self.files.read_jsonl(relative)
                live = records.live_records(lines)
                kept = live if first is None else [r for r in live if _before(r, first)]
                if lines and first is not None:
                    marker = records.resume_marker(first, self.world_size, number,
                                                   len(live) - len(kept))
                    self.files.jsonl(relative).write(marker)
                on_resume(kept)
        self.meta.write()

    # -- the end --------------------------------------------------------------------------

    def on_exit(self, finisher: Callable[[str, str | None], object]) -> None:
        """``finisher(status, error)`` is called by the exit handler if the session was not
        finished (it must not communicate; ``status`` is ``"failed"`` or ``"incomplete"``)."""
        self._finishers.append(finisher)

    def finish(self, status: str, error: str | None = None) -> None:
        """Close the listeners, write the end into meta (status, error, end time) and
        release the run folder."""
        if self.closed:
            return
        self._listeners.close()
        self._end(status, error)

    def _end(self, status: str, error: str | None) -> None:
        self.start_segment()
        end = time.time()
        self.meta.segment.update(end_time=end, status=status)
        self.meta.update(end_time=end, status=status, error=error)
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
            if not self.closed:
                self._end(status, error)  # listeners are left to their own exit handlers

    def _participation_meta(self) -> dict:
        decision = self.participation.decision
        part: dict[str, object] = {"requested": self.participation.mode,
                                   "decision": decision, "reason": self.participation.reason}
        if decision is None:
            part.update(decision="pending", statistics="pending (decided at the first flush)")
        elif decision in (distributed.ALL_RANKS, distributed.SINGLE_PROCESS):
            part.update(statistics="global", contributing_ranks=list(range(self.world_size)))
        else:
            part.update(statistics="local", contributing_ranks=[0])
        return part


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
