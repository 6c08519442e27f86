"""Float64 numpy references for what the monitor should write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor import stats
from monitor.records import metrics_of

EMPTY = {"mean": None, "std": None, "min": None, "max": None, "count": 0, "nonfinite": 0}


def value_stats(row) -> dict:
    """The value object the monitor writes for one reduced row (6 host floats)."""
    rows = torch.tensor([list(row)], dtype=stats.DTYPE)
    return metrics_of(["x"], rows).get("x", EMPTY)


def reference_stats(values) -> dict:
    x = np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in values])
    finite = x[np.isfinite(x)]
    out = {"count": int(finite.size), "nonfinite": int(x.size - finite.size)}
    if finite.size:
        out.update(mean=finite.mean(), std=finite.std(), min=finite.min(), max=finite.max())
    else:
        out.update(mean=None, std=None, min=None, max=None)
    return out


def assert_matches(got: dict, want: dict, rel=1e-9, abs_=1e-12) -> None:
    assert got["count"] == want["count"]
    assert got["nonfinite"] == want["nonfinite"]
    for key in ("mean", "std", "min", "max"):
        if want[key] is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(want[key], rel=rel, abs=abs_), key


def due_labels(steps: list[int], interval: int) -> list[int]:
    """Record labels for a run that logs at ``steps`` (in order) and then finalizes."""
    labels, last = [], steps[0] - 1
    for s in steps:
        if s > last and s // interval > last // interval:
            labels.append(s)
            last = s
    if labels[-1] != steps[-1] and steps[-1] not in labels:
        labels.append(steps[-1])
    return labels


def bucket_of(step: int, labels: list[int]) -> int:
    return next(label for label in labels if label >= step)
