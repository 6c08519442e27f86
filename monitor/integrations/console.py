"""Console: one line per train record on rank 0, through ``logging.getLogger("monitor")``.

Sample (INFO)::

    monitor: step 1200 | loss 0.713 | lr 1.0e-04 | 3.2 steps/s | 51.2 samples/s
    monitor: step 1300 | loss 0.702 | lr 1.0e-04 | 3.1 steps/s | nonfinite: loss (rank 3)

Throughput is the steps between this record and the previous one over the wall time
between them (none on the first record); samples/s only when the global batch size is
given (``samples_per_step``). A record with NaN/Inf values ends the line with the metrics
that had them and the ranks that saw them (the first 3 metrics, then how many more). Silence it with
``logging.getLogger("monitor").setLevel(logging.WARNING)`` or ``console=False``.
When nothing in the program configured logging (no handler on the ``monitor`` logger or
the root), a stderr handler is added to the ``monitor`` logger at the first line, and
that logger's level is set to INFO if it was unset.
"""

from __future__ import annotations

import logging

from monitor._log import log
from monitor.checks import check_positive_int
from monitor.records import nonfinite_text


class ConsoleListener:
    """A session listener that logs one summary line per train record."""

    def __init__(self, samples_per_step: int | None = None) -> None:
        if samples_per_step is not None:
            samples_per_step = check_positive_int("samples_per_step", samples_per_step)
        self.samples_per_step = samples_per_step
        self._previous: tuple[int, float] | None = None

    def publish(self, part: str, stream: str, record: dict) -> None:
        if part != "train" or stream != "train":
            return
        step, now = record["step"], record["time"]
        fields = [f"step {step}"]
        metrics = record.get("metrics", {})
        for key, fmt in (("loss", ".4g"), ("lr", ".1e")):
            mean = metrics.get(key, {}).get("mean")
            if mean is not None:
                fields.append(f"{key} {mean:{fmt}}")
        if self._previous is not None and now > self._previous[1] and step > self._previous[0]:
            rate = (step - self._previous[0]) / (now - self._previous[1])
            fields.append(f"{rate:.3g} steps/s")
            if self.samples_per_step:
                fields.append(f"{rate * self.samples_per_step:.3g} samples/s")
        self._previous = (step, now)
        bad = nonfinite_text(metrics)
        if bad is not None:
            fields.append(bad)
        _ensure_handler()
        log.info("monitor: %s", " | ".join(fields))

    def close(self) -> None:
        pass


def _ensure_handler() -> None:
    if log.hasHandlers():
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
