"""A *part* of the log tree: what writes one part's records (``train``, ``lfp``, ...).

Every doc and meta file speaks of parts: the training metrics (``train``, written by
:class:`monitor.Monitor`) and each observer (``lfp``, ``film``, ``moe``, ``aggr``, or a
user's own). A :class:`PartWriter` is the record-writing half they share: its JSONL sinks, its
summary (:class:`monitor.records.SummaryTracker`), its alerts and non-finite tracking,
seeding all of that from the earlier segments of a resumed run, and its end
(:meth:`PartWriter.finish`). What produces the records (step contexts, hooks, the fused flush)
stays with the monitor or observer that owns the part.

Records are host-side dicts of values the flush already reduced: nothing here talks to
the device or to other ranks. Files are written on the writing rank only (the session's
``files`` do nothing elsewhere).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from monitor._log import log
from monitor.layout import validate_part
from monitor.records import SummaryTracker, alert_record, nonfinite_alerts
from monitor.session import MonitorSession, exit_status

SUMMARY_EVERY_S = 30.0
"""The running summary is rewritten after a record at most this often (and at the end)."""


_Self = TypeVar("_Self", bound="FinishesOnExit")


class FinishesOnExit:
    """The ``with`` form of whatever ends with ``finish(status, error)`` (the training
    monitor, the CogVLA facade): a clean exit finishes ``"completed"``, an exception
    ``"failed"`` with its type's name (and is not swallowed); ``sys.exit(0)`` is a normal
    exit (``"incomplete"``: nothing pending was reduced), ``sys.exit(n)`` ``"failed"``
    with ``"SystemExit(n)"`` (:func:`monitor.session.exit_status`)."""

    def finish(self, status: str, error: str | None = None) -> Any:
        raise NotImplementedError

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("completed")
        else:
            self.finish(*exit_status(exc))


def check_final_status(status: object) -> str:
    """What ``finalize(status)`` accepts."""
    if status not in ("completed", "failed"):
        raise ValueError(f"status must be 'completed' or 'failed', got {status!r}")
    return status  # type: ignore[return-value]


def _file_key(key: str, record: dict) -> str:
    return key


class PartWriter:
    """One part's files, summary and alerts.

    Args:
        session: the run.
        name: the part's name (``"train"``, ``"lfp"``, ...): its folder and its name in
            meta, the summary and the integrations.
        files: ``{file key: path relative to the run folder}`` of its JSONL streams.
        alert_file: the file key alert records go to.
        scope_key: what a record's scope is called in a non-finite alert (``"mode"`` for
            training records, ``"stream"`` for an observer's).
        scope_of: the scope of a record read back from file ``key`` at resume (default:
            the file key).
        summary_path: the summary file, relative to the run folder.
        summary_extra: called for the fields the owner adds to each summary.
        on_resume: called with ``(file key, live records)`` after those records of a
            resumed run's earlier segments seeded the summary and the alerts.
    """

    def __init__(self, session: MonitorSession, name: str, files: Mapping[str, str], *,
                 alert_file: str, scope_key: str, summary_path: str,
                 scope_of: Callable[[str, dict], str] | None = None,
                 summary_extra: Callable[[], dict] | None = None,
                 on_resume: Callable[[str, list[dict]], None] | None = None) -> None:
        self.session = session
        self.name = validate_part(name)
        self.scope_key = scope_key
        self._sinks = {key: session.files.jsonl(relative) for key, relative in files.items()}
        self.paths = {key: session.files.path(relative) for key, relative in files.items()}
        self.summary_path = session.files.path(summary_path)
        self._summary_relative = summary_path
        self._alert_file = alert_file
        self._scope_of = scope_of or _file_key
        self._summary_extra = summary_extra
        self._on_resume = on_resume
        self.summary = SummaryTracker()
        self.eta2 = SummaryTracker()
        """First/last/min/max of each metric's ``eta2`` value per stream (with groups)."""
        self.alerts: list[dict] = []
        self._nonfinite_seen: set[tuple[str, str]] = set()
        self._summary_written_at = -math.inf
        self.finished = False
        for key, relative in files.items():
            session.register_stream_file(relative, functools.partial(self._seed, key))

    def write(self, key: str, scope: str, record: dict, *,
              alerts: Iterable[dict] = ()) -> bool:
        """Append ``record`` (holding reduced ``metrics``) to file ``key``, hand it to the
        integrations as ``(part, scope, record)``, count it in the summary if it reached
        the disk, then write ``alerts`` and the alerts of its first non-finite values.
        Returns whether the record reached the disk."""
        step, metrics = record["step"], record["metrics"]
        written = self._sinks[key].write(record)
        self.session.publish(self.name, scope, record)
        if written:  # the summary counts what is on disk (a full disk loses records)
            self.summary.add(step, scope, metrics)
            if "eta2" in record:
                self._add_eta2(step, scope, record["eta2"])
        for alert in alerts:
            self.alert(step, alert)
        for alert in nonfinite_alerts(metrics, self._nonfinite_seen, self.scope_key, scope):
            self.alert(step, alert)
        if time.monotonic() - self._summary_written_at >= SUMMARY_EVERY_S:
            self.write_summary("running")
        return written

    def _add_eta2(self, step: int, scope: str, eta2: dict) -> None:
        self.eta2.add(step, scope, {m: {"mean": v.get("value") if isinstance(v, dict) else None,
                                        "nonfinite": 0} for m, v in eta2.items()})

    def alert(self, step: int, alert: dict) -> None:
        """Write an alert record (and log it on the writing rank)."""
        rec = alert_record(step, self.session.world_size, alert)
        self.alerts.append(rec)
        self._sinks[self._alert_file].write(rec)
        self.session.publish(self.name, "alert", rec)
        if self.session.world.is_writer:
            log.warning("monitor %s alert at step %d: %s", self.name, step, alert)

    def _seed(self, key: str, kept: list[dict]) -> None:
        """Seed the summary and alerts with an earlier segment's live records of ``key``."""
        for rec in kept:
            if isinstance(rec.get("metrics"), dict):
                self.summary.add(rec["step"], self._scope_of(key, rec), rec["metrics"])
                if isinstance(rec.get("eta2"), dict):
                    self._add_eta2(rec["step"], self._scope_of(key, rec), rec["eta2"])
            elif isinstance(rec.get("alert"), dict):
                self.alerts.append(rec)
        if self._on_resume is not None:
            self._on_resume(key, kept)

    def write_summary(self, status: str, error: str | None = None) -> None:
        """Rewrite the summary (compact while running; fsynced once the run has ended)."""
        self._summary_written_at = time.monotonic()
        if status != "running":
            self.session.start_segment()  # a resumed run that never flushed still seeds
        summary = self.summary.to_dict(self.session.run_id, self.session.start_time, status,
                                       error)
        if self._summary_extra is not None:
            summary.update(self._summary_extra())
        if self.eta2.records_written:
            summary["eta2"] = {scope: {m: {k: v for k, v in entry.items()
                                           if k != "nonfinite_ranks"}
                                       for m, entry in table.items()}
                               for scope, table in self.eta2.modes.items()}
        summary.update(alerts=self.alerts, degraded=self.session.degraded)
        self.session.files.write_json(self._summary_relative, summary, pretty=False,
                                      durable=status != "running")

    def finish(self, status: str, error: str | None = None) -> str:
        """Write the final summary with ``status`` (once; later calls do nothing) and
        return its path. The owner writes its pending records before."""
        if not self.finished:
            self.finished = True
            self.write_summary(status, error)
        return str(self.summary_path)
