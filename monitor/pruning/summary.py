"""Small helpers shared by the observers' ``get_summary()``."""

from __future__ import annotations


def empty_value() -> dict:
    """The value object of a metric that saw nothing yet (count 0, moments null)."""
    return {"mean": None, "std": None, "min": None, "max": None, "count": 0, "nonfinite": 0}


def pick(metrics: dict[str, dict], name: str) -> dict:
    """``metrics[name]``, or an empty value object when the last record lacked it."""
    value = metrics.get(name)
    return dict(value) if value is not None else empty_value()
