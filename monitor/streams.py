"""Record streams and the fused flush: whatever is due at a step goes through one reduction.

A :class:`Stream` is one JSONL stream of reduced records: the training metrics, or an
observer's compact or detailed records. Each has its own interval. The session's
:class:`FlushScheduler` sees every step call (``log_step``, ``step()``), marks each stream
that the step makes due, and flushes every stream that is due *together*: their rows are
packed into one buffer and reduced with one call of the reducer (2 collectives, at most 3),
however many streams, metrics, layers and observers there are.

Which forward belongs to which step: ``log_step(s)`` (and a ``step(s)`` context's entry)
comes *after* the forward it labels, as in the seed guide and the public CogVLA script, so
a call at step ``s`` labels what the hooks saw since the previous call as step ``s``. A
hook-fed stream (:class:`SlotStream`) cannot know at the call that makes it due at ``p``
whether more micro-batches of ``p`` follow (gradient accumulation), nor flush record ``p``
at the first call of a later step without the micro-batch whose forward has just run
(it belongs to the later step). So it double-buffers its slots (:class:`StatSlots`):

* while no record of it is due, hooks write into the main buffer;
* the call that makes it due at ``p`` (``split``) sends later hook values to a second
  buffer; every further call at ``p`` (another micro-batch of ``p``) folds the second
  buffer into the main one (``fold``: exact moments, on the device, no sync);
* the first call with a later step flushes the main buffer as record ``p``, and the
  second buffer, the micro-batch that has just run, becomes the main buffer.

Each of these first drains the observer's deferred hook work (``Observer.drain``), so a
value always lands in the buffer of the call it came before. The training monitor's
values come labelled (``step(s)`` contexts) and need no split.

When a due record is flushed depends only on step numbers and the calls made (never on
data, on which hooks fired, or on rank), so every rank issues the same collectives:

* at the first call with a later step (``advance``), every stream due at an earlier step;
* at the exit of a due train context once the run has shown that it does not accumulate
  gradients (``flush_due``), every stream due at that step, unless a flush already
  happened at that step (then at the next later call): at most one scheduled flush per
  step, so each flush carries one label;
* at ``finalize`` (``flush``), what each finalizing stream still holds, both buffers.

:meth:`FlushScheduler.flush_local` is the other way out, for a run that can no longer
reduce (ended by a signal): every stream's values since its last record, this rank's
own, including the rows of a flush still waiting in its collective, written without any
collective and marked as such.

Threads: the scheduler's bookkeeping, taking the rows and writing the records happen
under the session's lock; the collective itself does not (a watcher thread ending the
run at a signal can take what a blocked flush holds).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable

import torch

from monitor import stats
from monitor.schedule import IntervalSchedule
from monitor.slots import StatSlots


class Stream:
    """One stream of records reduced in the session's fused flushes.

    Subclasses implement :meth:`take_rows` (hand over and reset the local rows) and
    :meth:`emit` (turn the reduced rows into records). ``group`` names the stream in the
    packed layout and must be unique in the session and equal on every rank.
    """

    def __init__(self, group: str, interval: int | None = None,
                 interval_name: str = "log_interval") -> None:
        self.group = group
        self.schedule = None if interval is None else IntervalSchedule(interval, interval_name)
        self.pending: int | None = None

    def has_data(self) -> bool:
        """Whether a flush should include this stream (decided by calls, never by data)."""
        return True

    def take_rows(self, device: torch.device) -> tuple[list[str], torch.Tensor]:
        raise NotImplementedError

    def emit(self, step: int, names: list[str], rows: torch.Tensor,
             note: dict | None = None) -> None:
        """Write the record labelled ``step`` from the reduced ``rows`` of ``names``
        (``note``: its ``rank_local`` mark, or None)."""
        raise NotImplementedError

    def devices(self) -> set[torch.device]:
        """Devices that hold this stream's values (to tell whether taking them would wait)."""
        return set()

    def split(self) -> None:
        """The stream has just become due: what hooks see from now on may belong to a
        later step (see the module docstring). Nothing to do for labelled values."""

    def fold(self) -> None:
        """Another call at the due step: what hooks saw since belongs to it."""


class SlotStream(Stream):
    """A stream fed by hooks through declared :class:`StatSlots`, double-buffered at its
    due steps (see the module docstring).

    Args:
        drain: computes the deferred hook work of the stream's owner into the slots
            (``Observer.drain``); called before every buffer switch and every read.
    """

    def __init__(self, group: str, interval: int | None = None,
                 interval_name: str = "log_interval", *,
                 drain: Callable[[], None] = lambda: None) -> None:
        super().__init__(group, interval, interval_name)
        self.slots = StatSlots()
        self._drain = drain

    def split(self) -> None:
        self._drain()
        self.slots.split()

    def fold(self) -> None:
        self._drain()
        self.slots.fold()

    def take_rows(self, device: torch.device) -> tuple[list[str], torch.Tensor]:
        """The main buffer's rows; the next buffer (if split) becomes the main one."""
        self._drain()
        order = self.slots.names
        rows = self.slots.local_rows(order, device)
        self.slots.take_main()
        return order, rows


Reduce = Callable[[dict[str, list[str]], torch.Tensor, int, str],
                  "tuple[dict | None, dict | None]"]
"""``reduce(layout, rows, step, mode)`` -> ``(reduced rows by group or None, note)``."""


class FlushScheduler:
    """Tracks the run's step and flushes due streams together (see the module docstring).

    Args:
        reduce: the session's ``reduce(layout, rows, step, mode)``.
        device: where rows are packed.
    """

    def __init__(self, reduce: Reduce, device: Callable[[], torch.device],
                 lock: threading.RLock | None = None) -> None:
        self._reduce = reduce
        self._device = device
        self.lock = lock if lock is not None else threading.RLock()
        self.streams: list[Stream] = []
        self.local_only: list[Stream] = []
        """Streams flushed by their owner (eval modes), seen by :meth:`flush_local` only."""
        self._in_flight: dict[str, tuple[int, list[str], torch.Tensor]] | None = None
        self.current: int | None = None
        self.first_step: int | None = None
        """The first step this process saw (a resumed run's resume step)."""
        self.flushed_at: int | None = None
        """The step of the calls at which the last scheduled flush happened."""
        self._warned_backwards = False

    def add(self, stream: Stream) -> None:
        if any(s.group == stream.group for s in self.streams):
            raise ValueError(f"a stream named {stream.group!r} is already registered")
        self.streams.append(stream)

    def remove(self, stream: Stream) -> None:
        for streams in (self.streams, self.local_only):
            if stream in streams:
                streams.remove(stream)

    def advance(self, step: int) -> None:
        """The run is at ``step``: flush what an earlier step made due, then mark new dues."""
        with self.lock:
            if self.first_step is None:
                self.first_step = step
            # every pending label is <= current < step; the hooks' values of the forward
            # that has just run (step's) stay behind, in the next buffers
            later = self.current is not None and step > self.current
            due = [s for s in self.streams if s.pending is not None] if later else []
            if not later and self.current is not None:
                for stream in self.streams:  # another micro-batch of a due step
                    if stream.pending is not None:
                        stream.fold()
        if due:
            self._flush(due, at=step)  # not under the lock: it waits in a collective
        with self.lock:
            if self.current is not None and step < self.current and not self._warned_backwards:
                self._warned_backwards = True
                warnings.warn(
                    f"monitor: step went backwards ({self.current} -> {step}); records keep "
                    "their order of arrival",
                    RuntimeWarning,
                    stacklevel=4,
                )
            for stream in self.streams:
                if stream.schedule is not None and stream.schedule.reaches_new_multiple(step):
                    stream.pending = step
                    stream.split()
            self.current = step if self.current is None else max(self.current, step)

    def is_due(self, stream: Stream, step: int) -> bool:
        return stream.pending == step

    def flush_due(self, step: int) -> None:
        """Flush every stream due at ``step`` (the due train context's exit), unless a
        scheduled flush already happened at this step: then they wait for the next later
        call, so that each step has at most one scheduled flush, of one label."""
        with self.lock:
            if self.flushed_at is not None and self.flushed_at == self.current:
                return
            due = [s for s in self.streams if s.pending == step]
        self._flush(due, at=self.current)

    def flush(self, streams: Iterable[Stream], mode: str = "train",
              step: int | None = None) -> None:
        """Reduce everything ``streams`` hold (both buffers) together in one call; each
        writes its record(s). For finalize and for records labelled at their call (eval).

        A stream's record is labelled ``step`` if given, else with the step that made it
        due, else the current step (finalize).
        """
        with self.lock:
            streams = list(streams)
            for s in streams:
                s.fold()
        self._reduce_streams(streams, mode, step)

    def _flush(self, streams: list[Stream], at: int | None) -> None:
        """A scheduled flush of the main buffers of ``streams`` (at the calls of step ``at``)."""
        if self._reduce_streams(streams, "train", None):
            with self.lock:
                self.flushed_at = at

    def _reduce_streams(self, streams: list[Stream], mode: str, step: int | None) -> bool:
        """Reduce ``streams`` in one call; False when none of them had anything."""
        with self.lock:
            streams = list(streams)
            fallback = self.current if self.current is not None else 0
            labels = {s.group: step if step is not None else
                      s.pending if s.pending is not None else fallback for s in streams}
            for s in streams:
                s.pending = None
            streams = [s for s in streams if s.has_data()]
            if not streams:
                return False
            device = self._device()
            layout, parts, in_flight = {}, [], {}
            for s in streams:
                names, rows = s.take_rows(device)
                layout[s.group] = names
                parts.append(rows)
                in_flight[s.group] = (labels[s.group], names, rows)
            rows = torch.cat(parts) if len(parts) > 1 else parts[0]
            self._in_flight = in_flight
        try:
            reduced, note = self._reduce(layout, rows, max(labels[s.group] for s in streams),
                                         mode)
        except BaseException:
            with self.lock:
                if self._in_flight is in_flight:
                    self._in_flight = None
            raise
        # The rows stay in flight until their records are written, in one critical section:
        # a signal's end (flush_local) either takes them before, or finds them written.
        with self.lock:
            if self._in_flight is not in_flight:
                return True  # flush_local wrote them meanwhile
            try:
                if reduced is not None:
                    for s in streams:
                        names, host_rows = reduced[s.group]
                        s.emit(labels[s.group], names, host_rows, note)
            finally:
                self._in_flight = None
        return True

    def devices(self) -> set[torch.device]:
        """Every device holding values that :meth:`flush_local` would take."""
        out = {rows.device for _, _, rows in (self._in_flight or {}).values()}
        for s in (*self.streams, *self.local_only):
            out |= s.devices()
        return out

    def flush_local(self, note: dict | None) -> int:
        """Write every stream's values since its last record as they are on this rank (no
        collective), the rows of a flush blocked in its collective included; returns the
        number of streams written. ``note`` goes into each record as ``rank_local`` (None
        where this rank's values are the run's: one process, or rank 0 alone).

        The caller holds the lock and has checked that no device would make it wait.
        """
        in_flight, self._in_flight = self._in_flight or {}, None
        cpu = torch.device("cpu")
        written = 0
        for s in (*self.streams, *self.local_only):
            s.fold()  # the end: both buffers
            label, names, rows = self._pending_rows(s, in_flight, cpu)
            if rows is None:
                continue
            s.pending = None
            s.emit(label, names, rows, note)
            written += 1
        return written

    def _pending_rows(self, s: Stream, in_flight: dict, cpu: torch.device):
        fallback = self.current if self.current is not None else 0
        label = s.pending if s.pending is not None else fallback
        names, rows = [], None
        if s.group in in_flight:
            label, names, rows = in_flight[s.group]
            names, rows = list(names), rows.to(cpu)
        if s.has_data():
            now_names, now_rows = s.take_rows(cpu)
            if rows is None:
                names, rows = list(now_names), now_rows
            else:
                known = set(names)
                rows = _merge_rows(names, rows, list(now_names), now_rows)
                names = names + [n for n in now_names if n not in known]
        return label, names, rows


def _merge_rows(names: list[str], rows: torch.Tensor, more_names: list[str],
                more: torch.Tensor) -> torch.Tensor:
    """``rows`` (for ``names``) combined with ``more`` (for ``more_names``), by name; the
    names only ``more`` has are appended."""
    position = {n: i for i, n in enumerate(names)}
    extra = [n for n in more_names if n not in position]
    total = torch.cat([rows, stats.empty_rows(len(extra), rows.device)])
    for n in extra:
        position[n] = len(position)
    placed = stats.empty_rows(total.shape[0], rows.device)
    placed[[position[n] for n in more_names]] = more
    return stats.combine(total, placed)
