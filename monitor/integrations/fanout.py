"""The one container of a run's listeners (TensorBoard, W&B, the console line, your own).

The session holds one :class:`Listeners`; every record rank 0 writes is handed to each
listener (``publish(part, stream, record)``) and ``close()`` is called when the run ends.
A listener that raises is warned about once and dropped: training and the JSONL logs go
on. Only the writing rank keeps listeners.
"""

from __future__ import annotations

from typing import Protocol

from monitor._log import warn_or_log


class Listener(Protocol):
    """What ``MonitorSession.add_listener`` takes: any object with these two methods.

    ``publish(part, stream, record)``: ``part`` is ``"train"`` or an observer's part
    (``"lfp"``, ...); ``stream`` is the record's stream: the mode (``"train"``,
    ``"eval"``, ...) for training records, ``"events"`` or ``"detailed"`` for an
    observer's, and ``"alert"`` for alert records. Records are the plain dicts of the
    JSONL files, already reduced.
    """

    def publish(self, part: str, stream: str, record: dict) -> None: ...

    def close(self) -> None: ...


class Listeners:
    """The listeners of one run on this rank (empty and inert where ``active`` is False)."""

    def __init__(self, active: bool) -> None:
        self._active = active
        self._items: list[Listener] = []
        self._closed = False

    def add(self, listener: Listener) -> None:
        """Keep ``listener`` (on the writing rank, until the run ends).

        Raises:
            TypeError: it lacks ``publish`` or ``close``.
        """
        if not (callable(getattr(listener, "publish", None))
                and callable(getattr(listener, "close", None))):
            raise TypeError("a listener needs publish(part, stream, record) and close() "
                            f"methods, got {type(listener).__name__}")
        if self._active and not self._closed:
            self._items.append(listener)

    def __iter__(self):
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def publish(self, part: str, stream: str, record: dict) -> None:
        """Hand a record that was just written to every listener."""
        for listener in list(self._items):
            try:
                listener.publish(part, stream, record)
            except Exception as exc:  # noqa: BLE001 - an integration must not kill training
                self._drop(listener, "publish", exc)

    def abandon(self) -> None:
        """Drop every listener without closing it (the run ends at a signal: closing W&B
        could outlast the grace period; the process is about to die anyway)."""
        self._closed = True
        self._items = []

    def close(self) -> None:
        """Close every listener (at the run's end). Idempotent."""
        self._closed = True
        items, self._items = self._items, []
        for listener in items:
            try:
                listener.close()
            except Exception as exc:  # noqa: BLE001 - the run's end must complete
                self._drop(listener, "close", exc)

    def _drop(self, listener: Listener, what: str, exc: Exception) -> None:
        if listener in self._items:
            self._items.remove(listener)
        warn_or_log(f"monitor: {type(listener).__name__}.{what} failed "
                    f"({type(exc).__name__}: {exc}); that integration is turned off, "
                    "training and the JSONL logs go on", stacklevel=4)
