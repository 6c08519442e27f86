"""monitor: rank-reduced training and routing statistics for VLA finetuning (CogVLA first).

Public entry points:

* :class:`monitor.Monitor`: training scalars (loss, lr, extras), reduced across ranks at an
  interval and written by rank 0 to ``{run_dir}/monitor_logs/``.
* :class:`monitor.MonitorSession`: the shared run state (participation, reducer, meta).
* :mod:`monitor.pruning`: generic observers (``PruningObserver``, ``FiLMObserver``,
  ``MoERouterObserver``, ``AggregationObserver``) fed by model adapters;
  ``monitor.pruning.adapters.cogvla.CogVLAMonitoring`` is the CogVLA facade.

* :func:`monitor.read_run`: a run's log tree read back as lists of dicts (or DataFrames).
* ``python -m monitor report RUN_DIR`` / ``compare RUN_A RUN_B``: tables and PNG plots.
* :mod:`monitor.integrations`: TensorBoard, W&B and the console line.

See ``monitor/README.md`` for the log tree and every field.
"""

from monitor._version import __version__
from monitor.distributed import RankMismatchError
from monitor.observer import Observer
from monitor.pruning import (
    AggregationObserver,
    FiLMObserver,
    MoERouterObserver,
    PruningObserver,
)
from monitor.readback import PartLog, RunLog, read_run
from monitor.session import MonitorSession
from monitor.sinks import RunDirLockedError
from monitor.train import Monitor, StepHandle

__all__ = ["AggregationObserver", "FiLMObserver", "Monitor", "MoERouterObserver",
           "MonitorSession", "Observer", "PartLog", "PruningObserver", "RankMismatchError",
           "RunDirLockedError", "RunLog", "StepHandle", "__version__", "read_run"]
