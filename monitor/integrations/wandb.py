"""Weights & Biases: rank 0 logs each record into the W&B run, with the flat names of
:mod:`monitor.integrations.names` (none of which the public CogVLA script writes itself).

* An existing ``wandb.run`` (the training script called ``wandb.init``) is used as it is,
  and never finished by the monitor.
* With ``create=True`` (``enable_wandb=True``) and no run at the first record, the
  listener starts one (``project``, name = run id, ``dir`` = the run folder, the monitor's
  meta as config) and finishes it at finalize. ``WANDB_MODE=offline`` writes it to
  ``{run_dir}/wandb/offline-run-*``; ``wandb sync`` uploads it later.

Steps. W&B has one step counter per run, shared with the script, and drops whatever is
logged below it. A record labelled ``s`` is written at a call of a later step (or at the
exit of ``s``'s own train context), often after the script has already logged at that
later step, so it goes into the row ``max(s, wandb step)``, one past the row of the
previous record of its prefix if that row is taken, but never past the run's current step,
so that the script's own next ``wandb.log(..., step=current)`` is never dropped. A record
that has no free row yet (two records of one prefix written during one step: the last one
at ``finalize()``) waits for the next record or for the end of the run, where it takes
the next row. Each record
also carries ``monitor/{prefix}/step`` = ``s``, declared as the step metric of each of that
prefix's keys (key by key: a glob would also catch the script's ``monitor/...`` keys), so
charts show every value at its own record's step.

Export: compact by default, everything with ``export_all=True`` (see ``names``). Per-layer
series (``mean_hist``) are W&B histograms of the per-layer means.
"""

from __future__ import annotations

import sys

from monitor.integrations import check_extras, names
from monitor.session import MonitorSession


class WandbListener:
    """A session listener that logs records into a W&B run (rank 0)."""

    def __init__(self, session: MonitorSession, *, create: bool = False,
                 project: str | None = None, export_all: bool = False) -> None:
        if create:
            check_extras(wandb=True)
        self.session, self.create, self.project = session, create, project
        self.export_all = export_all
        self._run = None
        self._owned = False
        self._alerts: dict[str, int] = {}
        self._defined: set[str] = set()
        self._rows: dict[str, tuple[int, int]] = {}
        """Per prefix: (W&B row, record step) of its last record."""
        self._held: list[tuple[str, int, dict]] = []
        """Records waiting for a free row, in order: (prefix, step, data)."""
        self._closed = False

    def _get_run(self):
        if self._run is not None:
            return self._run
        wandb = sys.modules.get("wandb")
        if wandb is None and self.create:
            import wandb
        if wandb is None:
            return None
        run = wandb.run
        if run is None and self.create:
            run = wandb.init(project=self.project or "monitor", name=self.session.run_id,
                             dir=str(self.session.run_dir), config=self.session.meta.get("config"))
            self._owned = True
        self._run = run
        return run

    def publish(self, part: str, stream: str, record: dict) -> None:
        if self._closed:
            return
        run = self._get_run()
        if run is None:
            return
        import wandb

        base = names.prefix(part, stream)
        step_key = names.step_key(part, stream)
        data: dict = {}
        if stream == "alert":
            self._alerts[base] = self._alerts.get(base, 0) + 1
            data[names.name(base, names.RECORD, "alerts")] = self._alerts[base]
        data.update(names.scalars(part, stream, record, self.export_all))
        for key, hist in names.histograms(part, stream, record, self.export_all):
            data[key] = wandb.Histogram(np_histogram=(hist["counts"], hist["edges"]))
        for key, means in names.layer_profiles(part, stream, record, self.export_all):
            data[key] = wandb.Histogram(means, num_bins=min(len(means), 32))
        if not data:
            return
        self._define(run, step_key, data)
        data[step_key] = record["step"]
        self._held.append((base, record["step"], data))
        self._log_held(run)

    def _log_held(self, run, final: bool = False) -> None:
        while self._held:
            base, step, data = self._held[0]
            row = self._row(base, step, run.step, final)
            if row is None:
                return
            run.log(data, step=row)
            self._held.pop(0)

    def _define(self, run, step_key: str, data: dict) -> None:
        if step_key not in self._defined:
            run.define_metric(step_key, hidden=True)
            self._defined.add(step_key)
        for key in data:
            if key not in self._defined:
                run.define_metric(key, step_metric=step_key)
                self._defined.add(key)

    def _row(self, base: str, step: int, wandb_step: int, final: bool) -> int | None:
        """The W&B row of a record labelled ``step``, or None while it has none (see the
        module docstring)."""
        row = max(step, wandb_step)
        last = self._rows.get(base)
        if last is not None and last[1] != step and row <= last[0]:
            row = last[0] + 1
        current = self.session.scheduler.current
        if not final and row > max(wandb_step, step, current if current is not None else 0):
            return None
        self._rows[base] = (row, step)
        return row

    def close(self) -> None:
        if self._run is not None and not self._closed:
            self._log_held(self._run, final=True)
        self._closed = True
        if self._run is not None and self._owned:
            self._run.finish()
        self._run = None
