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

*Reduced* rows (what the reducer returns) may carry :func:`rank_columns` more columns after
the six: each rank's three *rank flags* for the row (its finite max is the global max, its
finite min is the global min, it saw a non-finite value), packed as bits of float64 integers
(:func:`rank_flags`) and summed over ranks. Every column holds the flags of
:data:`RANKS_PER_COLUMN` ranks (3 bits each: 51 bits, below 2**53), so the sum is exact in
any order and for any world size; :func:`lowest_ranks` and :func:`flagged_ranks` read it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

COUNT, MEAN, M2, MIN, MAX, NONFINITE = range(6)
NUM_COLS = 6
DTYPE = torch.float64

HOLDS_MAX, HOLDS_MIN, SAW_NONFINITE = 0, 1, 2
"""The three rank flags of a row: bit ``3 * j + flag`` of a rank column is rank
``RANKS_PER_COLUMN * column + j``'s flag."""
RANKS_PER_COLUMN = 17
_FLAGS = 3
_BITS = _FLAGS * RANKS_PER_COLUMN  # 51 < 53: a sum of distinct flags is an exact float64


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


def row_of_samples(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """One row (shape ``(1, 6)``) over every element of ``values``.

    Two-pass on the tensor itself (mean, then squared deviations), in float64.
    ``valid`` (a bool tensor broadcastable to ``values``) leaves elements out entirely
    (padding, samples a quantity does not apply to) without a data-dependent shape, so
    no host sync. The caller guarantees ``values.numel() > 0``.
    """
    return rows_of_samples(values.reshape(1, -1),
                           None if valid is None else valid.expand_as(values).reshape(1, -1))


def rows_of_samples(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """One row per leading index of the 2-d ``values`` ``(k, n)``: shape ``(k, 6)``.

    Several quantities of one hook call are summarised in one batch of kernels; a
    quantity with fewer samples than ``n`` marks the rest invalid in ``valid`` ``(k, n)``.
    """
    x = values.detach().to(DTYPE)
    finite = torch.isfinite(x)
    if valid is None:
        used = finite
        nonfinite = x.shape[1] - finite.sum(dim=1, dtype=DTYPE)
    else:
        used = finite & valid
        nonfinite = (valid & ~finite).sum(dim=1, dtype=DTYPE)
    count = used.sum(dim=1, dtype=DTYPE)
    mean = torch.where(used, x, 0.0).sum(dim=1) / count.clamp(min=1.0)
    m2 = torch.where(used, (x - mean.unsqueeze(1)).square(), 0.0).sum(dim=1)
    lo = torch.where(used, x, math.inf).amin(dim=1)
    hi = torch.where(used, x, -math.inf).amax(dim=1)
    return torch.stack([count, mean, m2, lo, hi, nonfinite], dim=1)


def constant_rows(values: list[float], count: int) -> torch.Tensor:
    """Rows on the CPU for host numbers each seen ``count`` times (no device work)."""
    rows = torch.zeros(len(values), NUM_COLS, dtype=DTYPE)
    v = torch.tensor(values, dtype=DTYPE)
    finite = torch.isfinite(v)
    n = torch.where(finite, float(count), 0.0)
    rows[:, COUNT] = n
    rows[:, MEAN] = torch.where(finite, v, 0.0)
    rows[:, MIN] = torch.where(finite, v, math.inf)
    rows[:, MAX] = torch.where(finite, v, -math.inf)
    rows[:, NONFINITE] = count - n
    return rows


class Bins:
    """Fixed histogram edges, ready for :func:`rows_of_bins_many` on any device.

    Bin ``b`` of a value is the number of edges ``<= value`` (0: below the first edge,
    ``len(edges)``: at or above the last), exactly as ``torch.bucketize(right=True)``
    gives it. For evenly spaced edges the bin is computed arithmetically and then
    corrected against the edges themselves (the estimate is never more than one bin
    off): the same bins, 1.2-2.9x faster than the binary search on one CPU thread
    (measured; memory bandwidth limits both for large inputs).
    """

    def __init__(self, edges) -> None:
        values = [float(e) for e in edges]
        if len(values) < 2 or any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError("edges must be >= 2 increasing numbers")
        self.edges = values
        width = (values[-1] - values[0]) / (len(values) - 1)
        self.uniform = all(
            math.isclose(b - a, width, rel_tol=1e-6) for a, b in zip(values, values[1:])
        )
        self._start, self._inv_width = values[0], 1.0 / width
        self._host = torch.tensor([-math.inf, *values, math.inf], dtype=DTYPE)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_rows(self) -> int:
        """Rows per histogram: below, ``len(edges) - 1`` bins, above, non-finite."""
        return len(self.edges) + 2

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(edges, padded edges)`` on ``device``, copied there once."""
        cached = self._on.get(device)
        if cached is None:
            padded = self._host.to(device)
            cached = self._on[device] = (padded[1:-1], padded)
        return cached

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """The row of each element of ``x`` (float64): ``0 .. len(edges)`` for finite
        values, ``len(edges) + 1`` for NaN/Inf."""
        edges, padded = self.tensors(x.device)
        n = len(self.edges)
        finite = torch.isfinite(x)
        if self.uniform:
            safe = torch.where(finite, x, 0.0)
            guess = ((safe - self._start) * self._inv_width).floor_().clamp_(-1, n - 1)
            guess = guess.to(torch.long).add_(1)  # 0 .. n
            flat = guess.reshape(-1)  # index_select: ~3x faster than x[idx] (measured)
            low = padded.index_select(0, flat).view_as(guess)
            high = padded.index_select(0, flat + 1).view_as(guess)
            idx = guess - (safe < low).to(torch.long) + (safe >= high).to(torch.long)
        else:
            idx = torch.bucketize(x.contiguous(), edges, right=True)
        return torch.where(finite, idx, n + 1)


def rows_of_bins_many(values: torch.Tensor, bins: Bins | Sequence[float]) -> torch.Tensor:
    """One histogram per leading index of the 2-d ``values`` ``(k, n)``, over the same
    edges, in one batch of kernels: shape ``(k * (len(edges) + 2), 6)``, histogram ``i``
    in rows ``i * (len(edges) + 2)`` onwards.

    Per histogram, row 0 counts values below ``edges[0]``, row ``j`` (1 <= j < len(edges))
    those in ``[edges[j-1], edges[j])``, row ``len(edges)`` those at or above ``edges[-1]``
    and the last row the non-finite values. Only COUNT is filled (each row is "COUNT
    samples, all 0"), so bins add up across calls and ranks through the ordinary row
    reduction."""
    if not isinstance(bins, Bins):
        bins = Bins(bins)  # host edges given directly (tests, one-off use)
    x = values.detach().to(DTYPE)
    k, nbins = x.shape[0], bins.num_rows
    idx = bins.index(x)
    idx += torch.arange(k, device=x.device).unsqueeze(1) * nbins
    counts = torch.zeros(k * nbins, dtype=DTYPE, device=x.device)
    # not bincount: that syncs on CUDA
    counts.scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=DTYPE,
                                                       device=x.device))
    rows = empty_rows(k * nbins, x.device)
    rows[:, COUNT] = counts
    return rows


def grouped_rows(values: torch.Tensor, groups: torch.Tensor, num_groups: int,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """One row per quantity and group, of one value per sample: ``(k, num_groups, 6)`` for
    ``values`` ``(k, B, n)``.

    Sample ``b`` of the batch belongs to group ``groups[b]`` (a long tensor ``(B,)`` on
    ``values``' device, each in ``0 .. num_groups``; ``num_groups`` itself is a discard
    bucket for samples of no group, left out of the result). Its value of quantity ``i`` is
    the mean of its ``n`` elements ``values[i, b]`` that are finite and ``valid`` (as in
    :func:`rows_of_samples`); a sample with none is not counted. A group's row holds the
    moments, min and max of its samples' values (COUNT: how many samples), and NONFINITE the
    NaN/Inf elements of its samples (left out of their means). Two-pass per group, with
    ``index_add`` and ``scatter_reduce_`` on the device: no loop over groups, no host sync.
    """
    k, batch, n = values.shape
    if n == 1 and valid is None:  # one value per sample already (MoE, FiLM, aggregation)
        x = values.detach().reshape(k * batch).to(DTYPE)
        seen = torch.isfinite(x)
        bad = (~seen).to(DTYPE)
    else:
        per = rows_of_samples(values.reshape(k * batch, n),
                              None if valid is None else valid.reshape(k * batch, n))
        x, seen, bad = per[:, MEAN], per[:, COUNT] > 0, per[:, NONFINITE]
    x = torch.where(seen, x, 0.0)
    buckets = num_groups + 1
    index = (torch.arange(k, device=values.device).unsqueeze(1) * buckets
             + groups.to(torch.long).unsqueeze(0)).reshape(-1)  # (k * B,)
    sums = torch.zeros(k * buckets, 3, dtype=DTYPE, device=values.device).index_add_(
        0, index, torch.stack([seen.to(DTYPE), x, bad], dim=1))  # count, sum, non-finite
    n_g = sums[:, 0]
    mean_g = sums[:, 1] / n_g.clamp(min=1.0)
    spread = torch.where(seen, (x - mean_g.index_select(0, index)).square(), 0.0)
    m2 = torch.zeros_like(n_g).index_add_(0, index, spread)
    extremes = torch.full((k * buckets, 2), -math.inf, dtype=DTYPE, device=values.device)
    extremes.scatter_reduce_(0, index.unsqueeze(1).expand(-1, 2), torch.where(
        seen.unsqueeze(1), torch.stack([x, -x], dim=1), -math.inf), "amax")  # max, -min
    rows = torch.stack([n_g, mean_g, m2, -extremes[:, 1], extremes[:, 0], sums[:, 2]], dim=1)
    return rows.view(k, buckets, NUM_COLS)[:, :num_groups]


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


NUM_SUMS = 4
"""Columns of :func:`shifted_sums`."""


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


# -- rank flags (which rank held a row's min, max, non-finite values) ---------------------------

def rank_columns(world_size: int) -> int:
    """Rank-flag columns of a reduced row for ``world_size`` ranks (the same on every rank)."""
    return -(-max(world_size, 1) // RANKS_PER_COLUMN)


def rank_flags(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, rank: int,
               world_size: int) -> torch.Tensor:
    """``(k, rank_columns(world_size))``: this rank's flags for its ``rows`` against the
    global extremes ``lo``/``hi``, as float64 integers to be summed over ranks.

    A rank holds the max of a row when its *finite* max equals ``hi`` (a rank that saw
    nothing, or only non-finite values, has ``MAX = -inf`` and never does); equal values
    on several ranks (``0.0 == -0.0`` included) flag them all, and readers take the lowest.
    On the device of ``rows``, without a host sync.
    """
    mx, mn = rows[:, MAX], rows[:, MIN]
    flags = ((torch.isfinite(mx) & (mx == hi)).to(DTYPE) * float(1 << HOLDS_MAX)
             + (torch.isfinite(mn) & (mn == lo)).to(DTYPE) * float(1 << HOLDS_MIN)
             + (rows[:, NONFINITE] > 0).to(DTYPE) * float(1 << SAW_NONFINITE))
    out = torch.zeros(rows.shape[0], rank_columns(world_size), dtype=DTYPE, device=rows.device)
    column, j = divmod(rank, RANKS_PER_COLUMN)
    out[:, column] = flags * float(1 << (_FLAGS * j))
    return out


def _flag_mask(flag: int) -> int:
    return sum(1 << (_FLAGS * j + flag) for j in range(RANKS_PER_COLUMN))


def lowest_ranks(flags: torch.Tensor, flag: int) -> torch.Tensor:
    """The lowest rank with ``flag`` set in each row of the summed rank columns ``flags``
    ``(k, C)``: a long tensor ``(k,)``, -1 where no rank has it (vectorised, no loop)."""
    bits = flags.to(torch.int64) & _flag_mask(flag)
    # the lowest set bit is a power of two below 2**51, exact in float64: frexp gives its
    # position + 1 (0 for no bit, which the floor division below turns into -1)
    position = torch.frexp((bits & -bits).to(DTYPE)).exponent.to(torch.int64)
    in_column = (position - 1 - flag).div_(_FLAGS, rounding_mode="floor")
    if flags.shape[1] == 1:  # up to RANKS_PER_COLUMN ranks
        return in_column[:, 0]
    none = torch.iinfo(torch.int64).max
    columns = torch.arange(flags.shape[1], dtype=torch.int64) * RANKS_PER_COLUMN
    lowest = torch.where(in_column >= 0, in_column + columns, none).amin(dim=1)
    return torch.where(lowest == none, -1, lowest)


def flagged_ranks(flags: Sequence[float], flag: int) -> list[int]:
    """Every rank (sorted) with ``flag`` set in one row's summed rank columns (host floats)."""
    out = []
    for column, value in enumerate(flags):
        bits = int(value)
        for j in range(RANKS_PER_COLUMN):
            if bits >> (_FLAGS * j + flag) & 1:
                out.append(column * RANKS_PER_COLUMN + j)
    return out


def combine_all(rows: torch.Tensor) -> torch.Tensor:
    """One row ``(1, columns)`` of the union of the sample sets of every row of ``rows``
    (host rows, e.g. every component's reduced row of one metric).

    Rank columns, when present, are merged too: the ranks holding the combined max are
    those that held it in a row whose max is the combined max (same for the min); the
    ranks that saw non-finite values are those of every row.
    """
    total = empty_rows(1, rows.device)
    for i in range(rows.shape[0]):
        total = combine(total, rows[i : i + 1, :NUM_COLS])
    if rows.shape[1] == NUM_COLS:
        return total
    bits = rows[:, NUM_COLS:].to(torch.int64)  # (n, C)
    mx, mn = rows[:, MAX], rows[:, MIN]
    wanted = {HOLDS_MAX: torch.isfinite(mx) & (mx == total[0, MAX]),
              HOLDS_MIN: torch.isfinite(mn) & (mn == total[0, MIN]),
              SAW_NONFINITE: torch.ones_like(mx, dtype=torch.bool)}
    merged = torch.zeros(bits.shape[1], dtype=torch.int64, device=rows.device)
    for flag, use in wanted.items():
        masked = torch.where(use.unsqueeze(1), bits & _flag_mask(flag), 0)
        for row in masked:  # bitwise OR over the rows (a handful of components)
            merged |= row
    return torch.cat([total, merged.to(DTYPE).unsqueeze(0)], dim=1)
