"""When a record is due: pure step arithmetic, identical on every rank."""

from __future__ import annotations

from monitor.checks import as_int, check_positive_int

check_interval = check_positive_int
"""An interval: a positive int (numpy ints too), else ValueError/TypeError naming it."""


def check_step(step: object) -> int:
    """A step number: a non-negative int (numpy ints accepted; tensors refused: no host sync)."""
    value = as_int("step", step)
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    return value


class IntervalSchedule:
    """A record is due when the step reaches a multiple of ``interval`` not reached before.

    The first step seen counts as a start: with steps 0, 1, 2, ... and interval 100 the due
    steps are 0, 100, 200, ...; with steps starting at 1 they are 100, 200, ...; steps may
    jump (10, 20, ..., 110 makes 110 due when 100 was skipped) or repeat (gradient
    accumulation: a step is due once).
    """

    def __init__(self, interval: int, name: str = "log_interval") -> None:
        self.interval = check_interval(name, interval)
        self._last: int | None = None

    def reaches_new_multiple(self, step: int) -> bool:
        """True exactly once per multiple reached; remembers ``step`` when it is due."""
        if self._last is None:
            self._last = step - 1
        if step > self._last and step // self.interval > self._last // self.interval:
            self._last = step
            return True
        return False
