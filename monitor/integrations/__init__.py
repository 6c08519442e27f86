"""Integrations: TensorBoard, W&B and a console line, fed with the records rank 0 writes.

Each integration is a listener of the run's :class:`~monitor.session.MonitorSession`
(``session.add_listener``, kept in :class:`~monitor.integrations.fanout.Listeners`): after
rank 0 appends a record to its JSONL file, the session hands the same plain dict to every
listener (``publish(part, stream, record)``), and ``close()`` is called when the run ends.
Listeners only read host values that the flush already reduced: they add no collective and
no host-device sync, and only rank 0 holds them. One that raises at run time is warned
about once and turned off; training and the JSONL logs go on.

Flat names (TensorBoard tags, W&B keys) come from :mod:`monitor.integrations.names`:
``monitor/{mode or part}/{key}/{field}`` (``field`` = ``mean``, ``std``, ``min``, ``max``,
``hist``, ...), never a key the public CogVLA script writes itself. The default export is
compact (per-layer values combined and as one histogram per field: under 200 scalar keys
with every CogVLA part on); ``export_all=True`` exports every value of every record.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from monitor.checks import check_bool

if TYPE_CHECKING:  # the session imports the listener container from this package
    from monitor.session import MonitorSession


def check_extras(*, tensorboard: bool = False, wandb: bool | None = None) -> None:
    """Raise ImportError naming the extra to install for each integration turned on whose
    package is missing (call it before any file is written)."""
    for on, module, setting in ((tensorboard, "tensorboard",
                                 "tensorboard=True (enable_tensorboard)"),
                                (wandb, "wandb", "wandb=True (enable_wandb)")):
        if on and importlib.util.find_spec(module) is None:
            raise ImportError(f"{setting} needs the {module!r} package, which is not "
                              f'installed: pip install "monitor[{module}]"')


def add_integrations(session: MonitorSession, *, tensorboard: bool = False,
                     wandb: bool | None = None, wandb_project: str | None = None,
                     console: bool = True, samples_per_step: int | None = None,
                     export_all: bool = False) -> None:
    """Add the chosen integrations to ``session`` (call it on every rank).

    Args:
        tensorboard: write TensorBoard events to ``{run_dir}/tensorboard/``.
        wandb: ``None``: log into ``wandb.run`` when one exists at a record (never starts
            one); ``True``: log into it, or start one (``wandb.init``) at the first record;
            ``False``: never.
        wandb_project: the project of a run this starts (default ``"monitor"``).
        console: one ``logging`` line per train record (logger ``"monitor"``, INFO).
        samples_per_step: global batch size, for the console's samples/s (else omitted).
        export_all: TensorBoard and W&B get every value of every record (about 1,000
            scalar keys with every CogVLA part on) instead of the compact export.

    Raises:
        ImportError: an integration is turned on but its package is missing (on every
            rank, so that no rank goes on alone).
    """
    check_bool("export_all", export_all)
    check_extras(tensorboard=tensorboard, wandb=wandb)
    if not session.world.is_writer:
        return
    if tensorboard:
        from monitor.integrations.tensorboard import TensorBoardListener

        session.add_listener(TensorBoardListener(session, export_all=export_all))
    if wandb is not False:
        from monitor.integrations.wandb import WandbListener

        session.add_listener(WandbListener(session, create=bool(wandb), project=wandb_project,
                                           export_all=export_all))
    if console:
        from monitor.integrations.console import ConsoleListener

        session.add_listener(ConsoleListener(samples_per_step=samples_per_step))


__all__ = ["add_integrations", "check_extras"]
