"""``Monitor``: training scalars (loss, lr, extras) reduced across ranks at an interval.

Usage::

    mon = Monitor(run_dir="runs/exp1", run_id="exp1", log_interval=100)
    for step in range(num_steps):
        ...
        with mon.step(step, mode="train") as h:
            h.log(loss=loss.detach(), lr=scheduler.get_last_lr()[0], extra={"l1": l1})
    mon.finalize()

``log`` never waits for the device: tensors stay on their device, Python numbers on the
host, until the flush. The record labelled ``s`` holds every value logged since the
previous record at steps up to and including ``s``; it is written at the first call with
a later step (every micro-batch of ``s`` is in it then), or already at the exit of step
``s``'s context once the run has shown that it does not accumulate gradients (a step
with exactly one train context has ended, and none had several), and ``finalize()``
writes whatever is pending. ``mode="eval"``/``"val"``/``"test"`` contexts
write one record at every exit.

Keys emitted in ``monitor_logs/{run_id}.jsonl`` (``metrics`` object):

=====================  ===========================================================
key                    value
=====================  ===========================================================
each ``log`` keyword   ``{"mean", "std", "min", "max", "count", "nonfinite", "min_rank",
                       "max_rank"}`` (+ ``"nonfinite_ranks"`` when ``nonfinite > 0``)
each ``extra`` key     same object
=====================  ===========================================================

The first time a metric of a mode has non-finite values in a record, an alert line
``{"step", "time", "world_size", "alert": {"type": "nonfinite", "mode", "metric",
"nonfinite", "count", "nonfinite_ranks"}}`` follows that record (once per metric and mode;
training goes on). A train record whose ``loss`` max is more than 6 standard deviations
above the previous 32 train records' values is followed by a ``loss_spike`` alert
(``spike_*`` arguments; :mod:`monitor.alerts`).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping

from monitor.alerts import LossSpike
from monitor.checks import check_bool, check_positive_int
from monitor.integrations import add_integrations, check_extras
from monitor.layout import TRAIN
from monitor.part import FinishesOnExit, PartWriter, check_final_status
from monitor.records import metrics_of, record
from monitor.schedule import check_step
from monitor.session import MonitorSession
from monitor.slots import StatSlots, as_samples
from monitor.streams import Stream

MODES = ("train", "eval", "val", "test")

AddValues = Callable[[str, dict], None]
"""Where a handle's values go: ``add(mode, {name: samples})``."""


def _discard(mode: str, values: dict) -> None:
    pass


class StepHandle:
    """What ``Monitor.step`` yields: ``log()`` adds values to the current step.

    Args:
        add: receives ``(mode, {name: samples})`` for each ``log()`` call.
        step, mode: the context's step and mode.
    """

    def __init__(self, add: AddValues, step: int, mode: str) -> None:
        self._add, self.step, self.mode = add, step, mode
        self._open = True

    @classmethod
    def discarding(cls, step: int, mode: str) -> StepHandle:
        """A handle whose ``log()`` checks its arguments and keeps nothing."""
        return cls(_discard, step, mode)

    def log(self, extra: Mapping[str, object] | None = None, **metrics: object) -> None:
        """Log metrics: each keyword and each key of ``extra`` is one metric.

        Values may be Python or numpy numbers, numpy arrays or tensors of any real dtype
        (every element of an n-d value is one sample). ``None`` values are skipped.

        Raises:
            TypeError: a value is not real-numeric, or ``extra`` is not a mapping.
            ValueError: a name is given both as a keyword and in ``extra``.
            RuntimeError: the step context has already ended.
        """
        if not self._open:
            raise RuntimeError(f"log() called after the context of step {self.step} ended")
        if extra is not None:
            if not isinstance(extra, Mapping):
                raise TypeError(f"extra must be a mapping or None, got {type(extra).__name__}")
            clash = sorted(set(extra) & set(metrics))
            if clash:
                raise ValueError(f"metric(s) {clash} given both as keyword and in extra")
            metrics = {**metrics, **extra}
        values = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"metric names must be non-empty strings, got {name!r}")
            sample = as_samples(name, value)
            if sample is not None:
                values[name] = sample
        self._add(self.mode, values)


class _ModeStream(Stream):
    """The records of one mode: its slots, its JSONL sink, its summary entries."""

    def __init__(self, monitor: Monitor, mode: str, interval: int | None) -> None:
        super().__init__(mode, interval, "log_interval")
        self.monitor, self.mode = monitor, mode
        self.slots = StatSlots()
        self.dirty = False  # a context of this mode was entered since the last flush

    def has_data(self) -> bool:
        return self.dirty

    def take_rows(self, device):
        order = sorted(self.slots.names)
        rows = self.slots.local_rows(order, device)
        self.slots.reset()
        self.dirty = False
        return order, rows

    def emit(self, step: int, names: list[str], rows, note: dict | None = None) -> None:
        self.slots.declare(names)  # adopt the union so the next flush takes the fast path
        self.monitor._write_record(step, self.mode, metrics_of(names, rows), note)

    def devices(self):
        return self.slots.devices


class Monitor(FinishesOnExit):
    """Training metrics of one run, reduced over every participating rank.

    Args:
        run_dir: the run's own folder (``runs/{run_id}``); files go to ``monitor_logs/``.
        run_id: names the files; a single path component.
        config_name: free text stored in meta (e.g. the dataset).
        log_interval: a train record is due each time the step reaches a new multiple.
        config: extra configuration to store in meta.
        participation: ``"auto"``, ``"all"`` or ``"local"`` (see ``MonitorSession``).
        participation_timeout: bounded wait, in seconds, for the other ranks' monitors.
        session: share an existing session (the CogVLA facade does); then the run and
            participation arguments above are taken from it, and due train records are
            reduced together with the session's other due streams.
        tensorboard: rank 0 also writes TensorBoard events to ``{run_dir}/tensorboard/``
            (needs ``pip install "monitor[tensorboard]"``).
        wandb: ``None`` logs into an existing ``wandb.run`` when there is one, ``True``
            also starts one (``pip install "monitor[wandb]"``), ``False`` never logs.
        console: a one-line summary through ``logging.getLogger("monitor")`` at each
            train record (rank 0).
        export_all: TensorBoard/W&B get every value of every record, not the compact
            export (``monitor.integrations.names``).
        handle_signals: SIGTERM/SIGINT end the run as ``"terminated"`` before the signal
            goes on (see ``MonitorSession``); False leaves signals alone.
        The five above apply when the monitor builds its own session; with ``session=``,
        whoever built it adds integrations (``monitor.integrations.add_integrations``).
        spike_metric, spike_k, spike_window, spike_warmup: the ``loss_spike`` alert: a
            train record whose ``spike_metric`` max exceeds mean + ``spike_k`` std of the
            previous ``spike_window`` train records' values, once ``spike_warmup`` records
            were seen (:class:`monitor.alerts.LossSpike`; ``spike_metric=None``: off).

    ``log()`` and ``step()`` may be called from several threads: every value is counted
    once (the session's lock guards the slots; it costs well under a microsecond a call).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        run_id: str | None = None,
        config_name: str | None = None,
        log_interval: int = 100,
        *,
        config: Mapping | None = None,
        participation: str = "auto",
        participation_timeout: float | None = None,
        session: MonitorSession | None = None,
        tensorboard: bool = False,
        wandb: bool | None = None,
        console: bool = True,
        export_all: bool = False,
        handle_signals: bool = True,
        spike_metric: str | None = "loss",
        spike_k: float = 6.0,
        spike_window: int = 32,
        spike_warmup: int = 8,
    ) -> None:
        log_interval = check_positive_int("log_interval", log_interval)
        self.spike = LossSpike(spike_metric, spike_k, spike_window, spike_warmup)
        check_bool("tensorboard", tensorboard)
        check_bool("wandb", wandb, none_ok=True)
        check_bool("console", console)
        check_bool("export_all", export_all)
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping or None, got {type(config).__name__}")
        train = _ModeStream(self, "train", log_interval)
        self.log_interval = log_interval
        self._owns_session = session is None
        if session is not None and (tensorboard or wandb or export_all):
            raise ValueError("tensorboard=/wandb=/export_all= apply to a monitor that builds "
                             "its own session; with session= call monitor.integrations."
                             "add_integrations(session, ...) instead")
        if session is None:
            if run_dir is None or run_id is None:
                raise TypeError("Monitor needs run_dir and run_id (or a session)")
            check_extras(tensorboard=tensorboard, wandb=wandb)  # before any file is written
            meta_config = {**(dict(config) if config else {}), "log_interval": log_interval}
            session = MonitorSession(
                run_dir, run_id, config_name=config_name, config=meta_config,
                participation=participation, participation_timeout=participation_timeout,
                handle_signals=handle_signals,
            )
            add_integrations(session, tensorboard=tensorboard, wandb=wandb, console=console,
                             export_all=export_all)
        self.session = session
        self.run_id = session.run_id
        self._scheduler = session.scheduler
        self._scheduler.add(train)
        self._streams: dict[str, _ModeStream] = {"train": train}
        layout = session.layout
        self.writer = PartWriter(session, TRAIN, {"records": layout.stream(TRAIN)},
                         alert_file="records", scope_key="mode",
                         summary_path=layout.summary(TRAIN),
                         scope_of=lambda key, rec: rec.get("mode", "train"),
                         on_resume=self._on_resume)
        self.jsonl_path = self.writer.paths["records"]
        self.summary_path = self.writer.summary_path
        self._last: int | None = None
        self._finalized = False
        session.on_exit(self.finish, summary=self.writer.write_summary)
        # Gradient accumulation shows as several train contexts at one step number. Until
        # a step with exactly one has ended (None: not known yet), and once a step had
        # several (True), a due record waits for the first call with a later step, so
        # that every micro-batch of the due step is in it, the first record included.
        self._train_contexts_here = 0
        self._accumulating: bool | None = None

    @property
    def alerts(self) -> list[dict]:
        """The alert records written so far (and a resumed run's earlier ones)."""
        return self.writer.alerts

    # -- public API ---------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, step: int, mode: str = "train") -> Iterator[StepHandle]:
        """Context for logging at ``step``; yields a :class:`StepHandle`."""
        step = check_step(step)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self._finalized:
            ended = self.session.ended_by
            why = "finalize()" if ended is None else f"the run was ended by {ended}"
            warnings.warn(f"Monitor.step() after {why}: ignored", RuntimeWarning, stacklevel=3)
            yield StepHandle.discarding(step, mode)
            return
        self._advance(step)
        with self.session.lock:
            if mode == "train":
                self._train_contexts_here += 1
                if self._train_contexts_here > 1:
                    self._accumulating = True
            stream = self._streams.get(mode)
            if stream is None:
                stream = self._streams[mode] = _ModeStream(self, mode, None)
                self._scheduler.local_only.append(stream)  # a signal's end still writes it
            stream.dirty = True
        handle = StepHandle(self._add, step, mode)
        try:
            yield handle
        finally:
            handle._open = False
        # Only on a clean exit: a rank that raised must not start a collective alone.
        if mode != "train":
            self._scheduler.flush([stream], mode=mode, step=step)
        elif self._scheduler.is_due(stream, step) and self._accumulating is False:
            self._scheduler.flush_due(step)

    def log_step(self, step: int) -> None:
        """The run is at ``step``: call it after each micro-batch's forward (it may repeat
        under gradient accumulation). It writes the records due at earlier steps."""
        step = check_step(step)
        if not self._finalized:
            self._advance(step)

    def finalize(self, status: str = "completed") -> str:
        """Write whatever is pending, then the summary and meta. Idempotent.

        Args:
            status: ``"completed"`` writes what is pending (a collective: call it on every
                rank); ``"failed"`` only writes the summary and meta, without a collective.

        Returns:
            The path of ``monitor_logs/{run_id}_summary.json``.
        """
        return self.finish(check_final_status(status))

    def finish(self, status: str, error: str | None = None) -> str:
        """End this part with any status (what ``finalize``, the context manager, the
        CogVLA facade and the exit handler call). Idempotent.

        ``"completed"`` writes what is pending (a collective: every rank calls it); any
        other status (``"failed"``, ``"incomplete"``, ``"terminated"``) only writes files. ``error``
        (an exception's type name) goes into the summary and meta. Returns the summary
        path.
        """
        if self._finalized:
            return str(self.summary_path)
        self._finalized = True
        try:
            if status == "completed":
                for mode in sorted(self._streams):
                    stream = self._streams[mode]
                    if stream.dirty:
                        self._scheduler.flush([stream], mode=mode)
        except BaseException as exc:
            status, error = "failed", type(exc).__name__
            raise
        finally:
            for stream in self._streams.values():
                self._scheduler.remove(stream)
            self.writer.finish(status, error)
            if self._owns_session:
                self.session.finish(status, error)
            else:
                self.session.meta.update(end_time=time.time(), status=status, error=error)
        return str(self.summary_path)

    # -- internals ----------------------------------------------------------------------

    def _advance(self, step: int) -> None:
        with self.session.lock:
            if self._last is not None and step > self._last:
                if self._train_contexts_here == 1 and self._accumulating is None:
                    self._accumulating = False
                self._train_contexts_here = 0
            self._last = step if self._last is None else max(self._last, step)
        self.session.log_step(step)

    def _add(self, mode: str, values: dict) -> None:
        with self.session.lock:  # threads: every value counted once
            slots = self._streams[mode].slots
            slots.declare(values)
            slots.update(values)

    def _write_record(self, step: int, mode: str, metrics: dict,
                      note: dict | None = None) -> None:
        if metrics:
            rec = record(step, mode, self.session.world_size, metrics)
            if note is not None:
                rec["rank_local"] = note
            alerts = self.spike.check(metrics) if mode == "train" else []
            self.writer.write("records", mode, rec, alerts=alerts)

    def _on_resume(self, key: str, kept: list[dict]) -> None:
        """A resumed run: the spike window holds the earlier segments' last train records."""
        value_of = self.spike.metric
        for rec in kept:
            metrics = rec.get("metrics")
            if rec.get("mode", "train") == "train" and isinstance(metrics, dict) and \
                    isinstance(metrics.get(value_of), dict):
                self.spike.observe(metrics[value_of])
