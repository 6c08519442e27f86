"""The package's logger and its one way to warn from code that must never raise."""

from __future__ import annotations

import logging
import warnings

log = logging.getLogger("monitor")


def warn_or_log(message: str, stacklevel: int = 2) -> None:
    """A ``RuntimeWarning``, or the same text logged at WARNING where warnings are errors
    (``-W error``, pytest's ``filterwarnings = error``): a monitoring problem never kills
    a run."""
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
    except RuntimeWarning:
        log.warning(message)
