"""Record streams and the fused flush: whatever is due at a step goes through one reduction.

A :class:`Stream` is one JSONL stream of reduced records: the training metrics, or an
observer's compact or detailed records. Each has its own interval. The session's
:class:`FlushScheduler` sees every step call (``log_step``, ``step()``), marks each stream
that the step makes due, and flushes every stream that is due *together*: their rows are
packed into one buffer and reduced with one call of the reducer (2 collectives, at most 3),
however many streams, metrics, layers and observers there are.

When a due record is flushed depends only on step numbers and the calls made (never on
data, on which hooks fired, or on rank), so every rank issues the same collectives:

* at the first call with a later step (``advance``), every stream due at an earlier step;
* at the exit of a due train context when the run does not accumulate gradients
  (``flush_due``), every stream due at that step;
* at ``finalize`` (``flush``), what each finalizing stream still holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from monitor.schedule import IntervalSchedule


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

    def emit(self, step: int, names: list[str], rows: torch.Tensor) -> None:
        """Write the record labelled ``step`` from the reduced ``rows`` of ``names``."""
        raise NotImplementedError


Reduce = Callable[[dict[str, list[str]], torch.Tensor, int, str], dict | None]


class FlushScheduler:
    """Tracks the run's step and flushes due streams together (see the module docstring).

    Args:
        reduce: the session's ``reduce(layout, rows, step, mode)``.
        device: where rows are packed.
    """

    def __init__(self, reduce: Reduce, device: Callable[[], torch.device]) -> None:
        self._reduce = reduce
        self._device = device
        self.streams: list[Stream] = []
        self.current: int | None = None
        self.first_step: int | None = None
        """The first step this process saw (a resumed run's resume step)."""
        self._warned_backwards = False

    def add(self, stream: Stream) -> None:
        if any(s.group == stream.group for s in self.streams):
            raise ValueError(f"a stream named {stream.group!r} is already registered")
        self.streams.append(stream)

    def remove(self, stream: Stream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)

    def advance(self, step: int) -> None:
        """The run is at ``step``: flush what an earlier step made due, then mark new dues."""
        if self.first_step is None:
            self.first_step = step
        if self.current is not None and step > self.current:
            # every pending label is <= current < step
            self.flush([s for s in self.streams if s.pending is not None])
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
        self.current = step if self.current is None else max(self.current, step)

    def is_due(self, stream: Stream, step: int) -> bool:
        return stream.pending == step

    def flush_due(self, step: int) -> None:
        """Flush every stream due at ``step`` (the due train context's exit)."""
        self.flush([s for s in self.streams if s.pending == step])

    def flush(self, streams: Iterable[Stream], mode: str = "train",
              step: int | None = None) -> None:
        """Reduce ``streams`` together in one call; each writes its record(s).

        A stream's record is labelled ``step`` if given, else with the step that made it
        due, else the current step (finalize).
        """
        streams = list(streams)
        fallback = self.current if self.current is not None else 0
        labels = {s.group: step if step is not None else
                  s.pending if s.pending is not None else fallback for s in streams}
        for s in streams:
            s.pending = None
        streams = [s for s in streams if s.has_data()]
        if not streams:
            return
        device = self._device()
        layout, parts = {}, []
        for s in streams:
            names, rows = s.take_rows(device)
            layout[s.group] = names
            parts.append(rows)
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        reduced = self._reduce(layout, rows, max(labels[s.group] for s in streams), mode)
        if reduced is None:
            return
        for s in streams:
            names, host_rows = reduced[s.group]
            s.emit(labels[s.group], names, host_rows)
