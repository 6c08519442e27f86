"""Base of the generic observers: declared slots, hooks, two record streams, a summary.

An observer (``monitor.pruning``) turns tensors that an adapter feeds it from forward
hooks into statistic rows, accumulated on the device. It owns two streams, reduced in the
session's fused flushes (:mod:`monitor.streams`):

* ``events``: the compact per-component stream, due every ``event_interval`` steps;
* ``detailed``: histograms and costlier statistics, due every ``detailed_interval`` steps.

Rank 0 writes them under ``{run_dir}/{part}_logs/``::

    {run_id}.jsonl            compact records (and alert records)
    {run_id}_detailed.jsonl   detailed records (metrics and histograms)
    {run_id}_summary.json     first/last/min/max of each metric's means, alerts, what was attached

The first time a metric has non-finite values in a record, an alert record
``{"alert": {"type": "nonfinite", "stream", "metric", "nonfinite", "count",
"nonfinite_ranks"}}`` goes to the compact stream (once per metric and stream; training goes
on). Values carry ``min_rank``/``max_rank`` (and ``nonfinite_ranks``) like the training
metrics' (:mod:`monitor.records`).

With ``group_names``, :meth:`Observer.set_groups` labels the samples of the next
forward(s), and each metric an observer declares with :meth:`Observer.declare_groups` gets
one row per group (``groups/{group}/{metric}``, one value per sample and hook call) in the
same fused flush, and each record an ``eta2`` object per such metric
(:mod:`monitor.groups`).

Every slot is declared before the first hook fires (:meth:`Observer.declare`), so every
rank reduces the same rows whichever hooks fired. Hooks run under ``torch.no_grad()`` on
detached tensors, return None and never raise into the model: an error inside one is
reported once as a warning, counted in meta, and that call's statistics are dropped. A
forward that activation checkpointing re-runs inside the backward pass is not counted
twice (hooks skip while a backward pass runs).

Hooks are cheap because most of the arithmetic is batched: an observer *defers* what a
hook gives it (:meth:`Observer.defer`: a copy or a reference, no kernel beyond that) and
computes the statistics of every deferred call at once, stacked, in :meth:`Observer.drain`.
A drain happens when a key comes back (the next forward pass), and before each step call
switches or reads this observer's slot buffers (:class:`monitor.streams.SlotStream`); so
at most one forward pass is ever held, and a record holds exactly the forwards its step
calls labelled (``log_step(s)`` after the forward: see :meth:`Observer.log_step`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from monitor import groups, stats
from monitor._log import warn_or_log
from monitor.part import PartWriter
from monitor.records import metrics_of, record
from monitor.schedule import check_step
from monitor.session import MonitorSession
from monitor.streams import SlotStream

HIST_SEP = "#"
"""Histogram bins are slots named ``{metric}#{bin}``."""


class _Current:
    def __repr__(self) -> str:
        return "CURRENT_GROUPS"


CURRENT_GROUPS = _Current()
"""Default of the ``groups=`` arguments: the labels of the last :meth:`Observer.set_groups`."""


_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def _in_backward() -> bool:
    """True inside a backward pass (where reentrant checkpointing recomputes forwards)."""
    return _graph_task_id is not None and _graph_task_id() >= 0


_JOINED_NAMES: dict[tuple, tuple[str, ...]] = {}


def joined_names(groups: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """The concatenation of name tuples, the same tuple object for the same groups (so
    :meth:`StatSlots.update_rows` finds its cached index)."""
    key = tuple(groups)
    joined = _JOINED_NAMES.get(key)
    if joined is None:
        if len(_JOINED_NAMES) >= 4096:  # bounded: a run has a handful of combinations
            _JOINED_NAMES.clear()
        joined = _JOINED_NAMES[key] = tuple(n for names in groups for n in names)
    return joined


class _ObserverStream(SlotStream):
    def __init__(self, observer: Observer, kind: str, interval: int, interval_name: str) -> None:
        group = observer.part if kind == "events" else f"{observer.part}/{kind}"
        super().__init__(group, interval, interval_name, drain=observer.drain)
        self.observer, self.kind = observer, kind

    def emit(self, step, names, rows, note=None) -> None:
        self.slots.declare(names)  # adopt the union so the next flush takes the fast path
        self.observer._emit(self.kind, step, names, rows, note)

    def devices(self):
        return self.slots.devices | self.observer.deferred_devices()


class Observer:
    """Common machinery of the generic observers (subclasses set ``part``).

    Args:
        session: the run this observer belongs to (shared with the training monitor).
        event_interval: steps between compact records.
        detailed_interval: steps between detailed records.
        group_names: the tasks (or any labels) of the run, fixed and identical on every
            rank; samples are labelled with :meth:`set_groups`, and each metric declared
            with :meth:`declare_groups` gets a row per group (``groups/{group}/{metric}``)
            and ``eta2`` (:mod:`monitor.groups`). None: no groups (nothing changes).
    """

    part = "observer"
    overall_metrics: tuple[str, ...] = ()
    """Metric names also combined over all components into ``overall/{name}``."""

    def __init__(self, session: MonitorSession, *, event_interval: int = 10,
                 detailed_interval: int = 500,
                 group_names: Sequence[str] | None = None) -> None:
        if not isinstance(session, MonitorSession):
            raise TypeError(f"session must be a MonitorSession, got {type(session).__name__}")
        self.group_names = groups.check_group_names(group_names)
        self.session = session
        self.run_id = session.run_id
        self.events = _ObserverStream(self, "events", event_interval, "pruning_event_log_interval")
        self.detailed = _ObserverStream(self, "detailed", detailed_interval,
                                        "detailed_log_interval")
        session.scheduler.add(self.events)
        session.scheduler.add(self.detailed)
        layout = session.layout
        self.writer = PartWriter(
            session, self.part,
            {"events": layout.stream(self.part), "detailed": layout.detailed(self.part)},
            alert_file="events", scope_key="stream", summary_path=layout.summary(self.part),
            summary_extra=self._summary_fields, on_resume=self._on_resume,
        )
        self.jsonl_path = self.writer.paths["events"]
        self.detailed_path = self.writer.paths["detailed"]
        self.summary_path = self.writer.summary_path
        self._hists: dict[str, list[float]] = {}
        self._bins: dict[tuple[str, ...], stats.Bins] = {}
        self._constants: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._deferred: dict[object, tuple[Callable, object]] = {}
        self._hooks: list = []
        self._hook_errors = 0
        self._warned_hook_error = False
        self.last_metrics: dict[str, dict] = {}
        self.last_step: int | None = None
        self.attached: dict = {}
        self._finalized = False
        self._group_ids: groups.GroupIds | None = None
        self._group_slots: dict[str, dict[str, tuple[str, ...]]] = {"events": {},
                                                                    "detailed": {}}
        self._group_error: ValueError | None = None
        self._ungrouped = 0
        self.last_eta2: dict[str, dict] = {}
        """The ``eta2`` objects of the last compact record (empty without groups)."""
        if self.group_names is not None:
            self.events.slots.declare([groups.INVALID])
            self.attached["groups"] = list(self.group_names)
        session.on_exit(lambda status, error: self.finalize(status, flush=False, error=error),
                        summary=self.writer.write_summary)

    @property
    def alerts(self) -> list[dict]:
        """The alert records written so far (and a resumed run's earlier ones)."""
        return self.writer.alerts

    # -- declaring slots ------------------------------------------------------------------

    def declare(self, events: Sequence[str] = (), detailed: Sequence[str] = ()) -> None:
        """Declare slot names of the compact and the detailed stream (before any hook)."""
        self.events.slots.declare(events)
        self.detailed.slots.declare(detailed)

    def declare_histogram(self, name: str, edges: Sequence[float]) -> tuple[str, ...]:
        """Declare a detailed histogram over fixed ``edges``; returns its slot names."""
        try:
            bins = stats.Bins(edges)
        except ValueError as exc:
            raise ValueError(f"histogram {name!r}: {exc}") from None
        self._hists[name] = bins.edges
        names = tuple(f"{name}{HIST_SEP}{i:02d}" for i in range(bins.num_rows))
        self.detailed.slots.declare(names)
        self._bins[names] = bins
        return names

    def add_to_histograms(self, names: Sequence[tuple[str, ...]], values: torch.Tensor) -> None:
        """Count row ``i`` of the 2-d ``values`` into histogram ``names[i]``, all at once.

        The histograms must share their edges (as one observer's histograms of one
        metric do).
        """
        bins = self._bins[names[0]]
        if any(self._bins[n] is not bins and self._bins[n].edges != bins.edges
               for n in names[1:]):
            raise ValueError("add_to_histograms: the histograms have different edges")
        rows = stats.rows_of_bins_many(values, bins)
        self.detailed.slots.update_rows(joined_names(names), rows)

    def on_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A cached copy of a constant host tensor (e.g. an index) on ``device``.

        The cache holds ``tensor`` itself beside its copy, so its ``id`` cannot be reused
        by another tensor while the entry lives, and checks identity on every hit.
        """
        key = (id(tensor), device)
        cached = self._constants.get(key)
        if cached is None or cached[0] is not tensor:
            cached = self._constants[key] = (tensor, tensor.to(device))
        return cached[1]

    # -- groups (see monitor.groups) ------------------------------------------------------

    def declare_groups(self, metrics: Sequence[str], kind: str = "events") -> None:
        """Declare ``groups/{group}/{metric}`` for every group and each of ``metrics`` in
        the ``kind`` stream (``"events"`` or ``"detailed"``); nothing without groups."""
        if self.group_names is None:
            return
        table = self._group_slots[kind]
        stream = self.events if kind == "events" else self.detailed
        for metric in metrics:
            if metric not in table:
                table[metric] = tuple(groups.key(g, metric) for g in self.group_names)
                stream.slots.declare(table[metric])

    def set_groups(self, ids: object) -> None:
        """Label the samples of the next forward(s): one index into ``group_names`` per
        sample (a list of ints, or a CPU or CUDA integer tensor), in effect until the next
        call; ``None`` labels nothing. No host sync: a tensor's ids are checked on its
        device (see :mod:`monitor.groups`).

        Raises:
            ValueError: the observer has no ``group_names``; a list holds an id outside
                them; or a tensor given before the last record held such ids (reported
                once, by this call, on every rank).
            TypeError: not ints.
        """
        error = self.take_group_error()
        if error is not None:
            raise error
        if ids is None:
            self._group_ids = None
            return
        if self.group_names is None:
            raise ValueError(f"monitor {self.part}: set_groups() needs group_names (the "
                             "labels the ids index), given when the observer is built")
        labels = groups.make_group_ids(ids, len(self.group_names))
        if labels.invalid is not None:
            with self.session.lock:
                self.events.slots.update_rows((groups.INVALID,), labels.invalid)
        self._group_ids = labels

    @property
    def current_groups(self) -> groups.GroupIds | None:
        """The labels in effect (what hooks deferred now will be grouped by)."""
        return self._group_ids

    def take_group_error(self) -> ValueError | None:
        """The error of ids outside ``group_names`` seen by the last records (once)."""
        error, self._group_error = self._group_error, None
        return error

    def add_group_rows(self, metrics: Sequence[str], values: torch.Tensor,
                       valid: torch.Tensor | None = None, *, labels: object = CURRENT_GROUPS,
                       kind: str = "events") -> None:
        """Fold per-sample values into the group slots of ``metrics`` (declared with
        :meth:`declare_groups`): ``values`` ``(len(metrics), B, n)``, sample ``b``'s ``n``
        values of each metric (``valid`` leaves elements out). ``labels``: a
        :class:`~monitor.groups.GroupIds` or None (default: the labels in effect).
        Nothing without groups or labels; a batch of another size than the labels is
        left out of every group (said once, counted in meta)."""
        if labels is CURRENT_GROUPS:
            labels = self._group_ids
        if labels is None or self.group_names is None:
            return
        assert isinstance(labels, groups.GroupIds)
        ids = labels.on(values.device) if values.shape[1] == labels.batch else None
        if ids is None:
            self._skip_groups(values, labels)
            return
        rows = stats.grouped_rows(values, ids, len(self.group_names), valid)
        table = self._group_slots[kind]
        stream = self.events if kind == "events" else self.detailed
        stream.slots.update_rows(joined_names([table[m] for m in metrics]),
                                 rows.reshape(-1, stats.NUM_COLS))

    def _skip_groups(self, values: torch.Tensor, labels: groups.GroupIds) -> None:
        self._ungrouped += 1
        self.attached["ungrouped_calls"] = self._ungrouped
        if self._ungrouped == 1:
            why = (f"a batch of {values.shape[1]} samples, but set_groups() gave "
                   f"{labels.batch} ids" if values.shape[1] != labels.batch else
                   f"ids on {labels.ids.device} for values on {values.device} (reading them "
                   "there would wait for the device)")
            warn_or_log(f"monitor {self.part}: {why}: those values are in no group (said "
                        "once; meta counts such calls as ungrouped_calls)")

    # -- hooks ----------------------------------------------------------------------------

    def hook(self, module: torch.nn.Module, fn: Callable, *, name: str) -> None:
        """Register ``fn(module, args, kwargs, output)`` as a forward hook on ``module``.

        The hook runs under ``torch.no_grad()``, returns None (the output is never
        replaced), and an exception inside it is reported, not raised into the model.
        """
        lock = self.session.lock

        def forward_hook(mod, args, kwargs, output):
            # activation checkpointing re-runs the forward: seen already; after the end
            # (a signal's watcher thread does not remove hooks under a running forward)
            if _in_backward() or self._finalized:
                return None
            try:
                # not inference mode either: tensors made there could never be updated
                # in place (reset at a flush) once training goes on outside it
                with lock, torch.inference_mode(False), torch.no_grad():
                    fn(mod, args, kwargs, output)
            except Exception as exc:  # noqa: BLE001 - monitoring must never kill training
                self._on_hook_error(name, exc)
            return None

        self._hooks.append(module.register_forward_hook(forward_hook, with_kwargs=True))

    def defer(self, key: object, process: Callable[[list], None], item: object) -> None:
        """Hold ``item`` until the next drain, where ``process`` gets every item deferred
        with it (in call order) as one list. A key deferred again drains first, so a
        drain never mixes two forward passes. ``item`` must not be changed in place by
        the model afterwards: defer copies (or tensors the model never touches again)."""
        if key in self._deferred:
            self.drain()
        self._deferred[key] = (process, item)

    @staticmethod
    def inplace_version(tensor: torch.Tensor) -> int | None:
        """``tensor``'s in-place version counter, for :meth:`unchanged` (None for an
        inference tensor, which has none)."""
        return None if tensor.is_inference() else tensor._version

    def unchanged(self, items: list[tuple]) -> list[tuple]:
        """The deferred ``items`` (tuples ending in ``(..., tensor, tensor._version)``) whose
        tensor was not modified in place since it was deferred; the others are dropped
        with one warning (their values are no longer the ones the model used)."""
        kept = [it for it in items if it[-1] is None or it[-2]._version == it[-1]]
        if len(kept) < len(items):
            self._on_hook_error("deferred statistics", RuntimeError(
                "a tensor was modified in place after its hook ran"))
        return kept

    def deferred_devices(self) -> set[torch.device]:
        """The devices of the tensors held for the next drain."""
        out = set()
        for _, item in self._deferred.values():
            for value in item if isinstance(item, (tuple, list)) else (item,):
                if isinstance(value, torch.Tensor):
                    out.add(value.device)
        return out

    def drain(self) -> None:
        """Compute the statistics of every deferred call (no host sync)."""
        if not self._deferred:
            return
        deferred, self._deferred = self._deferred, {}
        groups: dict[Callable, list] = {}
        for process, item in deferred.values():
            groups.setdefault(process, []).append(item)
        for process, items in groups.items():
            try:
                with torch.inference_mode(False), torch.no_grad():
                    process(items)
            except Exception as exc:  # noqa: BLE001 - monitoring must never kill training
                self._on_hook_error(getattr(process, "__name__", "deferred statistics"), exc)

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @property
    def num_hooks(self) -> int:
        return len(self._hooks)

    def _on_hook_error(self, name: str, exc: Exception) -> None:
        self._hook_errors += 1
        if not self._warned_hook_error:
            self._warned_hook_error = True
            warnings.warn(
                f"monitor {self.part}: hook on {name} failed ({type(exc).__name__}: {exc}); "
                "its statistics are dropped, training goes on (reported once, counted in meta)",
                RuntimeWarning,
                stacklevel=2,
            )

    # -- steps and records ----------------------------------------------------------------

    def log_step(self, step: int) -> None:
        """Label what the hooks saw since the previous call as optimizer step ``step``.

        Call it after each micro-batch's forward (and backward), repeating ``step`` under
        gradient accumulation. A compact record is written at the first call with a later
        step than the step it is due at (so that every micro-batch of that step is in it),
        and :meth:`get_summary` reflects the last record written (``last_step``).
        """
        step = check_step(step)
        if not self._finalized:
            self.session.log_step(step)

    def _emit(self, kind: str, step: int, names: list[str], rows: torch.Tensor,
              note: dict | None = None) -> None:
        hist_rows = [i for i, n in enumerate(names) if HIST_SEP in n]
        plain = [i for i, n in enumerate(names) if HIST_SEP not in n]
        metrics = metrics_of([names[i] for i in plain], rows[plain])
        metrics.update(self._overall(names, rows))
        out: dict = {"metrics": metrics}
        if hist_rows:
            hists = self._histograms([names[i] for i in hist_rows], rows[hist_rows])
            if hists:
                out["histograms"] = hists
        if not metrics and "histograms" not in out:
            return
        eta2 = self._eta2(kind, names, rows) if self._group_slots[kind] else None
        rec = record(step, None, self.session.world_size, metrics)
        if eta2 is not None:
            rec["eta2"] = eta2
        rec.update(out)
        if note is not None:
            rec["rank_local"] = note
        alerts: list[dict] = []
        if kind == "events":
            self.last_metrics, self.last_step = metrics, step
            self.last_eta2 = eta2 or {}
            alerts = self._invalid_ids(metrics) + self.check_alerts(step, metrics)
        self.writer.write(kind, kind, rec, alerts=alerts)

    def _overall(self, names: list[str], rows: torch.Tensor) -> dict[str, dict]:
        """``overall/{m}``: the rows of every component's ``m`` combined (exact moments)."""
        out = {}
        for metric in self.overall_metrics:
            idx = [i for i, n in enumerate(names) if n.rsplit("/", 1)[-1] == metric
                   and not n.startswith(("overall/", groups.PREFIX))]
            if not idx:
                continue
            out.update(metrics_of([f"overall/{metric}"], stats.combine_all(rows[idx])))
        return out

    def _eta2(self, kind: str, names: list[str], rows: torch.Tensor) -> dict[str, dict]:
        """``{metric: eta2 object}`` of the group metrics of ``kind`` (reduced rows)."""
        table = self._group_slots[kind]
        position = {n: i for i, n in enumerate(names)}
        missing = len(names)  # an empty row appended below: a slot no rank sent
        index = [position.get(n, missing) for slots in table.values() for n in slots]
        padded = torch.cat([rows[:, : stats.NUM_COLS], stats.empty_rows(1)])
        picked = padded[index].view(len(table), -1, stats.NUM_COLS)
        return dict(zip(table, groups.eta2_values(picked)))

    def _invalid_ids(self, metrics: dict[str, dict]) -> list[dict]:
        """An ``invalid_group_ids`` alert (and the error the next set_groups raises) when
        the record counted ids outside group_names."""
        value = metrics.get(groups.INVALID)
        if value is None or not value["count"] or self.group_names is None:
            return []
        self._group_error = groups.invalid_ids_error(self.part, value, len(self.group_names))
        return [{"type": "invalid_group_ids", "count": value["count"], "min_id": value["min"],
                 "max_id": value["max"], "num_groups": len(self.group_names),
                 "min_rank": value.get("min_rank"), "max_rank": value.get("max_rank")}]

    def _histograms(self, names: list[str], rows: torch.Tensor) -> dict[str, dict]:
        counts = rows[:, stats.COUNT].tolist()
        by_name: dict[str, list[float]] = {}
        for n, c in zip(names, counts):
            by_name.setdefault(n.split(HIST_SEP)[0], []).append(c)
        out = {}
        for name, c in by_name.items():
            if sum(c) == 0:
                continue
            c = [int(v) for v in c]
            # a histogram only another rank declared: its edges are that rank's (null here)
            out[name] = {"edges": self._hists.get(name), "counts": c[1:-2], "below": c[0],
                         "above": c[-2], "nonfinite": c[-1]}
        return out

    def check_alerts(self, step: int, metrics: dict[str, dict]) -> list[dict]:
        """Alerts raised by a compact record (host-side, rank 0's reduced values)."""
        return []

    # -- summary and end ------------------------------------------------------------------

    def get_summary(self) -> dict:
        """The last compact record's values (no collective); subclasses shape it."""
        return dict(self.last_metrics)

    def describe(self, **info) -> None:
        """Record what an adapter attached (written to the run's meta under ``parts``)."""
        self.attached.update(info)
        self.session.meta.set_part(self.part, {**self.attached,
                                               "hook_errors": self._hook_errors})

    def finalize(self, status: str = "completed", *, flush: bool = True,
                 error: str | None = None) -> str:
        """Remove the hooks, write what is pending (unless ``flush=False``) and the summary.

        Idempotent. ``flush=True`` with ``status="completed"`` reduces (a collective: call
        it on every rank); ``error`` (an exception's type name) goes into the summary.
        """
        if self._finalized:
            return str(self.summary_path)
        self._finalized = True
        if self.session.ended_by is None:  # at a signal, maybe in the middle of a forward
            self.remove_hooks()
        try:
            if flush and status == "completed":
                self.session.scheduler.flush([self.events, self.detailed])
        finally:
            self.session.scheduler.remove(self.events)
            self.session.scheduler.remove(self.detailed)
            self.describe()
            self.writer.finish(status, error)
        return str(self.summary_path)

    def _on_resume(self, kind: str, kept: list[dict]) -> None:
        """A resumed run: the last compact values are the earlier segments' last."""
        if kind != "events":
            return
        for rec in kept:
            if isinstance(rec.get("metrics"), dict):
                self.last_metrics, self.last_step = rec["metrics"], rec["step"]

    def _summary_fields(self) -> dict:
        return {"part": self.part, "attached": self.attached,
                "hook_errors": self._hook_errors, "last": self.get_summary()}
