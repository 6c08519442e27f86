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
import gc
import os
import platform
import socket
import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from monitor import distributed, records, signals
from monitor._version import __version__
from monitor.checks import check_bool
from monitor.integrations.fanout import Listener, Listeners
from monitor.layout import RunLayout, validate_run_id
from monitor.meta import RunMeta, plain_config
from monitor.schedule import check_step
from monitor.sinks import NullRunFiles, RunDirLockedError, RunFiles
from monitor.streams import FlushScheduler

__all__ = ["MonitorSession", "exit_status", "validate_run_id"]

TERMINATE_WAIT_S = 2.0
"""At a signal: how long the end waits for the lock (a thread inside ``log()``) and for a
busy device to finish its queued work before the values since the last record are written
(a hung device is never waited on beyond this: its values are then given up)."""


def check_run_dir(run_dir: object) -> Path:
    """``run_dir`` as a Path; refuses what is not a path and the empty string (it would
    write into the working directory)."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run_dir must be a str or os.PathLike, got {type(run_dir).__name__}")
    if not os.fspath(run_dir).strip():
        raise ValueError(f"run_dir must name a folder, got {os.fspath(run_dir)!r} (an empty "
                         "run_dir would write into the working directory)")
    return Path(run_dir)


def exit_status(exc: BaseException | None) -> tuple[str, str | None]:
    """``(status, error)`` of a run that an exception ends (``with`` form, exit handler).

    ``SystemExit`` with code 0 or None is a normal exit: ``"incomplete"`` (nothing pending
    was reduced); any other code is ``"failed"`` with ``"SystemExit(code)"``.
    """
    if exc is None:
        return "incomplete", None
    if isinstance(exc, SystemExit):
        if exc.code is None or exc.code == 0:
            return "incomplete", None
        return "failed", f"SystemExit({exc.code!r})"
    return "failed", type(exc).__name__


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
        handle_signals: end the run (status ``"terminated"``) when SIGTERM or SIGINT
            arrives, then let the signal go on as before (:mod:`monitor.signals`).

    Raises:
        RunDirLockedError: another live process writes ``run_dir`` (rank 0 only), or a live
            session of this process has the same ``run_dir`` and ``run_id`` (every rank).

    Reliability (see "Guarantees" in ``monitor/README.md``): rank 0 holds the run folder's
    lock while the session lives; write failures degrade the session instead of raising;
    when the process exits without the session being finished (an uncaught exception, a
    script that never calls ``finalize()``), an exit handler writes the summaries and meta
    with ``status`` ``"failed"`` (and the error's type) or ``"incomplete"``, without any
    collective. A resumed run (the same folder and run id again) appends to the same files
    and, at its first flush, marks the dead segment's records at or after its first step as
    superseded. SIGTERM/SIGINT end the run through :meth:`terminate`. Only the process that
    built the session ends it: a forked child never writes its status.

    Threads: ``lock`` (re-entrant) guards every slot update, the scheduler's bookkeeping and
    the writing of records; ``log()``, ``step()`` and hooks may run in several threads.
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
        handle_signals: bool = True,
    ) -> None:
        self.run_dir = check_run_dir(run_dir)
        self.layout = RunLayout(run_id, self.run_dir)
        self.run_id = self.layout.run_id
        check_bool("handle_signals", handle_signals)
        if config is not None and not isinstance(config, Mapping) \
                and not hasattr(config, "__dataclass_fields__"):
            raise TypeError("config must be a mapping or a dataclass, got "
                            f"{type(config).__name__}")
        self.built_at = _caller()
        key = _claim(self)
        self.pid = os.getpid()
        self.lock = threading.RLock()
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
        self._summary_writers: list[Callable[[str, str | None], object]] = []
        self.closed = False
        self.ended_by: str | None = None
        """The signal's name once :meth:`terminate` ran."""
        self._warned_group_gone = False
        self._exit_guard = _ExitGuard(weakref.ref(self))
        atexit.register(self._exit_guard)
        _watch_sys_exit()
        self._reducer: distributed.Reducer | None = None
        self.scheduler = FlushScheduler(self.reduce, lambda: self.device, self.lock)
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
            "signals": signals.watch(self) if handle_signals else [],
        }, start_time=self.start_time, records_exist=self.files.holds_records(self.layout))
        # after a failed write, the first write that works again rewrites meta (degraded)
        self.files.health.on_recovery = _weak_call(self.meta.write)
        _live[key] = weakref.ref(self)

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
        """Reduce packed rows; returns ``({group: (names, reduced CPU rows)} or None, note)``.

        ``note`` is None, or the ``rank_local`` mark of rows that could not be reduced: the
        process group was destroyed before this flush (``finalize()`` after
        ``destroy_process_group()``), so each rank keeps its own and rank 0 writes its own.
        """
        if not self._segment_started:
            self.start_segment()
        note = None
        if self.world.initialized and not distributed.group_alive():
            self._warn_group_gone()
            if not self.world.is_writer:
                return None, None
            union, reduced = layout, rows.cpu()  # host sync: once per flush
            note = self.rank_local_note("process group destroyed before finalize()")
        else:
            reducer = self.reducer()
            if reducer is None:
                return None, None
            union, reduced = reducer.reduce(layout, rows, step, mode)
        out, start = {}, 0
        for group, names in union.items():
            out[group] = (names, reduced[start : start + len(names)])
            start += len(names)
        return out, note

    def rank_local_note(self, reason: str) -> dict | None:
        """The ``rank_local`` mark of a record holding this rank's values only, where a
        record would otherwise hold every rank's (None in a world of one or rank 0 alone)."""
        if self.world_size <= 1 or self.participation.decision in (
                distributed.RANK0_ONLY, distributed.NO_PROCESS_GROUP,
                distributed.SINGLE_PROCESS):
            return None
        return {"rank": self.world.rank, "reason": reason}

    def _warn_group_gone(self) -> None:
        if self._warned_group_gone:
            return
        self._warned_group_gone = True
        warnings.warn("monitor: the process group was destroyed before this flush (finalize() "
                      "after dist.destroy_process_group()?): the values since the last record "
                      "are this rank's own, written by rank 0 and marked rank_local; call "
                      "finalize() before destroy_process_group() for global statistics",
                      RuntimeWarning, stacklevel=2)

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

    def on_exit(self, finisher: Callable[[str, str | None], object],
                summary: Callable[[str, str | None], object] | None = None) -> None:
        """``finisher(status, error)`` is called by the exit handler and by
        :meth:`terminate` if the session was not finished (it must not communicate;
        ``status`` is ``"failed"``, ``"incomplete"`` or ``"terminated"``). ``summary(status,
        error)``, if given, writes the part's summary without finishing it (at a signal,
        before anything else)."""
        self._finishers.append(finisher)
        if summary is not None:
            self._summary_writers.append(summary)

    def finish(self, status: str, error: str | None = None) -> None:
        """Close the listeners, write the end into meta (status, error, end time) and
        release the run folder. In a process forked from the one that built the session,
        only releases."""
        if self.closed:
            return
        self._listeners.close()
        self._end(status, error)

    def _write_end(self, status: str, error: str | None) -> None:
        self.start_segment()
        end = time.time()
        self.meta.segment.update(end_time=end, status=status)
        self.meta.update(end_time=end, status=status, error=error)

    def _end(self, status: str, error: str | None) -> None:
        if os.getpid() == self.pid:
            self._write_end(status, error)
        self.close()

    def close(self) -> None:
        """Release the lock and the exit handler (no file is written)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self._exit_guard)
        signals.unwatch(self)
        _release(self)
        self.files.close()

    def abandon(self) -> None:
        """The exit handler: finish every part that was never finished, without a
        collective (other ranks may be gone). Nothing in a forked child.

        An uncaught exception is ``"failed"`` with its type; ``sys.exit(n)`` with n != 0
        is ``"failed"`` with ``"SystemExit(n)"``; any other exit ``"incomplete"``.
        """
        if self.closed or os.getpid() != self.pid:
            return
        error_type = getattr(sys, "last_type", None)
        if error_type is not None:
            status, error = "failed", error_type.__name__
        else:
            status, error = exit_status(_requested_exit)
        self._finish_parts(status, error)

    def _finish_parts(self, status: str, error: str | None) -> None:
        try:
            for finisher in list(self._finishers):
                finisher(status, error)
        finally:
            if not self.closed:
                self._end(status, error)  # listeners are left to their own exit handlers

    def terminate(self, signal_name: str) -> None:
        """End the run at a signal, as the exit handler would, with status ``"terminated"``
        and the signal's name as ``error``; never a collective, never a blocking wait on
        the device. Called by :mod:`monitor.signals` (from the main thread's handler or from
        the watcher thread while the main thread is blocked in C code).

        In order: meta (status, error, end time), every part's summary; then, on the
        writing rank, the values logged since each stream's last record (this rank's own,
        including the rows of a flush blocked in its collective) as one final record per
        stream, marked ``rank_local`` where a record would hold every rank's values. That
        step is skipped when the lock or a busy device is not free within
        :data:`TERMINATE_WAIT_S` (a hung NCCL stream never returns a copy). Then the
        summaries again (counting those records), meta, and the run folder's lock is
        released. Integrations get nothing more (closing W&B could outlast the grace
        period). Idempotent; nothing in a forked child.
        """
        if self.closed or self.ended_by is not None or os.getpid() != self.pid:
            return
        self.ended_by = signal_name
        status, error = "terminated", signal_name
        locked = self.lock.acquire(timeout=TERMINATE_WAIT_S)
        try:
            self._listeners.abandon()
            self._write_end(status, error)
            for write_summary in list(self._summary_writers):
                write_summary(status, error)
            if locked and self.files.is_writer and _devices_idle(self.scheduler.devices()):
                self.scheduler.flush_local(self.rank_local_note(signal_name))
        finally:
            try:
                self._finish_parts(status, error)
            finally:
                if locked:
                    self.lock.release()

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


_live: dict[tuple[str, str], weakref.ref] = {}
"""The live sessions of this process by (real path of run_dir, run_id)."""


def _key(session: MonitorSession) -> tuple[str, str]:
    return os.path.realpath(session.run_dir), session.run_id


def _claim(session: MonitorSession) -> tuple[str, str]:
    """Refuse a second live session on the same run folder and run id in this process."""
    key = _key(session)
    first = _live_at(key)
    if first is not None:
        del first
        gc.collect()  # a monitor dropped without finalize() may only wait for the collector
        first = _live_at(key)
    if first is None:
        return key
    raise RunDirLockedError(
        f"run_dir {str(session.run_dir)!r} with run_id {session.run_id!r} is already written by "
        f"a live monitor of this process (built at {first.built_at}); finalize() it first, "
        "share it (the CogVLA facade's parts share one session), or give this one another "
        "run_id")


def _live_at(key: tuple[str, str]) -> MonitorSession | None:
    ref = _live.get(key)
    first = None if ref is None else ref()
    if first is None or first.closed or first.pid != os.getpid():
        return None
    return first


def _release(session: MonitorSession) -> None:
    key = _key(session)
    ref = _live.get(key)
    if ref is not None and ref() is session:
        del _live[key]


def _caller() -> str:
    """``file:line`` of the first frame outside the monitor package (who built it)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _weak_call(method) -> Callable[[], None]:
    """``method()`` through a weak reference (no cycle through the files' health)."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        bound = ref()
        if bound is not None:
            bound()
    return call


def _devices_idle(devices: set[torch.device], wait: float = TERMINATE_WAIT_S) -> bool:
    """Whether values on ``devices`` can be copied to the host without waiting on a device:
    the CPU always; a CUDA device once its current stream has finished its queued work
    (polled for at most ``wait`` seconds); any other device never."""
    deadline = time.monotonic() + wait
    for device in devices:
        if device.type == "cpu":
            continue
        if device.type != "cuda":
            return False
        stream = torch.cuda.current_stream(device)
        while not stream.query():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
    return True


_requested_exit: SystemExit | None = None
"""The ``SystemExit`` of the last ``sys.exit()`` call: the exit handler's only way to learn
the exit code (an exit by ``SystemExit`` does not set ``sys.last_type``)."""


def _watch_sys_exit() -> None:
    """Wrap ``sys.exit`` once so the exit handler knows the code it was called with."""
    real = sys.exit
    if getattr(real, "_monitor_wrapper", False):
        return

    def exit(status: str | int | None = None) -> None:
        global _requested_exit
        _requested_exit = SystemExit(status)
        real(status)

    exit._monitor_wrapper = True  # type: ignore[attr-defined]
    exit.__doc__ = real.__doc__
    exit.__wrapped__ = real  # type: ignore[attr-defined]
    sys.exit = exit  # type: ignore[assignment]


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
