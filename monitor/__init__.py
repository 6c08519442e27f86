"""monitor: rank-reduced training and routing statistics for VLA finetuning (CogVLA first).

Public entry points:

* :class:`monitor.Monitor`: training scalars (loss, lr, extras), reduced across ranks at an
  interval and written by rank 0 to ``{run_dir}/monitor_logs/``.
* :class:`monitor.MonitorSession`: the shared run state (participation, reducer, meta).

See ``monitor/README.md`` for the log tree and every field.
"""

from monitor._version import __version__
from monitor.distributed import RankMismatchError
from monitor.session import MonitorSession
from monitor.train import Monitor, StepHandle

__all__ = ["Monitor", "MonitorSession", "RankMismatchError", "StepHandle", "__version__"]
