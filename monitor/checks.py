"""Argument checks shared by every setting of the package: one function, one message each.

Each setting is checked where it is owned (the class that uses it); a configuration
object that forwards a setting calls the same function with its own field's name, so the
message names what the user typed.
"""

from __future__ import annotations

import numbers
import operator


class SettingTypeError(TypeError, ValueError):
    """A setting or argument of the wrong type. Also a ``ValueError``: the observers raised
    that for a wrong type before their checks moved here, and callers may catch it."""


def as_int(name: str, value: object) -> int:
    """A Python or numpy int; bools and torch tensors refused (reading one is a host sync)."""
    if not isinstance(value, bool) and not type(value).__module__.startswith("torch"):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise SettingTypeError(f"{name} must be a Python int, got {type(value).__name__}")


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an int > 0 (numpy ints too), else TypeError/ValueError naming ``name``."""
    value = as_int(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_fraction(name: str, value: object) -> float:
    """A real number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingTypeError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not 0.0 < number < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return number


def check_bool(name: str, value: object, *, none_ok: bool = False) -> bool | None:
    """A bool (or None where ``none_ok``)."""
    if value is None and none_ok:
        return None
    if not isinstance(value, bool):
        raise SettingTypeError(f"{name} must be a bool{' or None' if none_ok else ''}, "
                               f"got {value!r}")
    return value


def check_positive_number(name: str, value: object) -> float:
    """A finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingTypeError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not (number > 0.0 and number != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return number
