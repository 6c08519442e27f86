"""Weights & Biases: rank 0 logs each record into the W&B run, with the flat names of
:mod:`monitor.integrations.names` (the ones the public CogVLA script exports by hand).

* An existing ``wandb.run`` (the training script called ``wandb.init``) is used as it is,
  and never finished by the monitor.
* With ``create=True`` (``enable_wandb=True``) and no run at the first record, the
  listener starts one (``project``, name = run id, ``dir`` = the run folder, the monitor's
  meta as config) and finishes it at finalize. ``WANDB_MODE=offline`` writes it to
  ``{run_dir}/wandb/offline-run-*``; ``wandb sync`` uploads it later.

Every logged dict carries ``monitor/step`` (the record's step), declared as the step
metric of ``monitor/*``, so charts use the training step even where W&B's own step
counter is ahead. Records go in at ``step=record step`` when that does not go back in
W&B's counter, else at its current step.
"""

from __future__ import annotations

import sys

from monitor.integrations import check_extras, names
from monitor.session import MonitorSession

STEP_KEY = "monitor/step"


class WandbListener:
    """A session listener that logs records into a W&B run (rank 0)."""

    def __init__(self, session: MonitorSession, *, create: bool = False,
                 project: str | None = None) -> None:
        if create:
            check_extras(wandb=True)
        self.session, self.create, self.project = session, create, project
        self._run = None
        self._owned = False
        self._alerts: dict[str, int] = {}
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
        if run is not None:
            run.define_metric(STEP_KEY, hidden=True)
            run.define_metric("monitor/*", step_metric=STEP_KEY)
            self._run = run
        return run

    def publish(self, part: str, kind: str, record: dict) -> None:
        if self._closed:
            return
        run = self._get_run()
        if run is None:
            return
        import wandb

        step = record["step"]
        data: dict = {STEP_KEY: step}
        if kind == "alert":
            self._alerts[part] = self._alerts.get(part, 0) + 1
            data[f"monitor/{part}/alerts"] = self._alerts[part]
        data.update(names.scalars(part, kind, record))
        for name, hist in names.histograms(part, kind, record):
            data[name] = wandb.Histogram(np_histogram=(hist["counts"], hist["edges"]))
        if step >= run.step:
            run.log(data, step=step)
        else:
            run.log(data)

    def close(self) -> None:
        self._closed = True
        if self._run is not None and self._owned:
            self._run.finish()
        self._run = None
