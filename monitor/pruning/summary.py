"""Small helpers shared by the observers' ``get_summary()``."""

from __future__ import annotations

from collections.abc import Iterable


def empty_value() -> dict:
    """The value object of a metric that saw nothing yet (count 0, moments null)."""
    return {"mean": None, "std": None, "min": None, "max": None, "count": 0, "nonfinite": 0,
            "min_rank": None, "max_rank": None}


def pick(metrics: dict[str, dict], name: str) -> dict:
    """``metrics[name]``, or an empty value object when the last record lacked it."""
    value = metrics.get(name)
    return dict(value) if value is not None else empty_value()


def by_group(metrics: dict[str, dict], step: int | None, overall: Iterable[str],
             groups: Iterable[str], names: Iterable[str], key: str) -> dict:
    """``{"step", overall metric: value, key: {group: {name: value}}}`` from a record."""
    names = tuple(names)
    out: dict = {"step": step}
    out.update({name: pick(metrics, f"overall/{name}") for name in overall})
    out[key] = {g: {name: pick(metrics, f"{g}/{name}") for name in names} for g in groups}
    return out
