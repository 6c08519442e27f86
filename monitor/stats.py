"""Pure tensor maths for statistic rows: no hooks, no I/O, no collectives.

A *row* summarises a set of samples in six float64 columns::

    COUNT  MEAN  M2  MIN  MAX  NONFINITE

``COUNT`` is the number of finite samples, ``MEAN`` their mean, ``M2`` the sum of squared
deviations from that mean (so the population variance is ``M2 / COUNT``), ``MIN``/``MAX``
their extremes (``+inf``/``-inf`` when empty) and ``NONFINITE`` the number of NaN/Inf samples,
which never enter the other columns.

Rows combine exactly with Chan et al.'s parallel update (:func:`combine`), so accumulating in
many small pieces, on several devices or several ranks, gives the moments of the
concatenation without the cancellation of a raw sum of squares. Every function here works on
the device of its input and never reads a value back to the host.
"""

from __future__ import annotations

import math

import torch

COUNT, MEAN, M2, MIN, MAX, NONFINITE = range(6)
NUM_COLS = 6
DTYPE = torch.float64


def empty_rows(num_rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows that have seen nothing: zeros, with MIN = +inf and MAX = -inf."""
    rows = torch.zeros(num_rows, NUM_COLS, dtype=DTYPE, device=device)
    rows[:, MIN] = math.inf
    rows[:, MAX] = -math.inf
    return rows


def reset_rows_(rows: torch.Tensor) -> torch.Tensor:
    """Empty ``rows`` in place (keeps the storage, so memory stays flat)."""
    rows.zero_()
    rows[:, MIN] = math.inf
    rows[:, MAX] = -math.inf
    return rows


def row_of_samples(values: torch.Tensor) -> torch.Tensor:
    """One row (shape ``(1, 6)``) over every element of ``values``.

    Two-pass on the tensor itself (mean, then squared deviations), in float64.
    The caller guarantees ``values.numel() > 0``.
    """
    x = values.detach().reshape(-1).to(DTYPE)
    finite = torch.isfinite(x)
    count = finite.sum(dtype=DTYPE)
    mean = torch.where(finite, x, 0.0).sum() / count.clamp(min=1.0)
    m2 = torch.where(finite, (x - mean).square(), 0.0).sum()
    lo = torch.where(finite, x, math.inf).amin()
    hi = torch.where(finite, x, -math.inf).amax()
    nonfinite = x.numel() - count
    return torch.stack([count, mean, m2, lo, hi, nonfinite]).unsqueeze(0)


def rows_of_scalars(values: torch.Tensor) -> torch.Tensor:
    """One row per element of the 1-d ``values`` (each a single sample)."""
    x = values.detach().reshape(-1).to(DTYPE)
    finite = torch.isfinite(x)
    count = finite.to(DTYPE)
    return torch.stack(
        [
            count,
            torch.where(finite, x, 0.0),
            torch.zeros_like(x),
            torch.where(finite, x, math.inf),
            torch.where(finite, x, -math.inf),
            1.0 - count,
        ],
        dim=1,
    )


def combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of the union of the sample sets of ``a`` and ``b`` (same shape ``(k, 6)``)."""
    na, nb = a[:, COUNT], b[:, COUNT]
    n = na + nb
    delta = b[:, MEAN] - a[:, MEAN]
    frac = nb / n.clamp(min=1.0)
    return torch.stack(
        [
            n,
            a[:, MEAN] + delta * frac,
            a[:, M2] + b[:, M2] + delta * delta * na * frac,
            torch.minimum(a[:, MIN], b[:, MIN]),
            torch.maximum(a[:, MAX], b[:, MAX]),
            a[:, NONFINITE] + b[:, NONFINITE],
        ],
        dim=1,
    )


def combine_into_(acc: torch.Tensor, index: torch.Tensor | int, new: torch.Tensor) -> None:
    """Fold ``new`` rows into ``acc[index]`` in place (no host sync).

    ``index`` is a Python int (one row) or a 1-d long tensor without duplicates on
    ``acc``'s device.
    """
    if isinstance(index, int):
        acc[index : index + 1].copy_(combine(acc[index : index + 1], new))
    else:
        acc.index_copy_(0, index, combine(acc.index_select(0, index), new))


def midrange_shift(global_min: torch.Tensor, global_max: torch.Tensor) -> torch.Tensor:
    """A per-row shift inside the data's range, identical on every rank.

    Moments summed around it lose no precision to cancellation (constant data gives a
    variance of exactly 0). Rows without finite data get shift 0.
    """
    ok = torch.isfinite(global_min) & torch.isfinite(global_max)
    mid = global_min * 0.5 + global_max * 0.5
    return torch.where(ok, mid, 0.0)


def shifted_sums(rows: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``(k, 4)``: COUNT, sum(x - shift), sum((x - shift)^2), NONFINITE: summable across ranks."""
    count = rows[:, COUNT]
    d = rows[:, MEAN] - shift
    return torch.stack(
        [count, count * d, rows[:, M2] + count * d * d, rows[:, NONFINITE]], dim=1
    )


def rows_from_sums(
    sums: torch.Tensor, shift: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """Invert :func:`shifted_sums` after they were summed over ranks."""
    n = sums[:, 0]
    safe_n = n.clamp(min=1.0)
    mean_d = sums[:, 1] / safe_n
    var = (sums[:, 2] / safe_n - mean_d * mean_d).clamp(min=0.0)
    mean = torch.where(n > 0, shift + mean_d, 0.0)
    return torch.stack([n, mean, var * n, lo, hi, sums[:, 3]], dim=1)
